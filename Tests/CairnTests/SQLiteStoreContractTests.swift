import CairnCore
import CairnStore
import Foundation
import Logging
import XCTest

/// The shared MetadataStore behaviour (StoreContract) against the embedded SQLite store.
final class SQLiteStoreContractTests: XCTestCase {
    var dir = ""
    var store: SQLiteStore!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-store-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
    }

    override func tearDown() async throws {
        store = nil
        try? FileManager.default.removeItem(atPath: dir)
    }

    func testOneVolumeAtTheSamePathInTwoContainersIsTwoPublishes() async throws {
        try await StoreContract.oneVolumeAtTheSamePathInTwoContainersIsTwoPublishes(store)
    }

    func testVolumesAreCreatedFoundListedAndDeletedWithTheirRecords() async throws {
        try await StoreContract.volumesAreCreatedFoundListedAndDeletedWithTheirRecords(store)
    }

    func testAttachRaisesTheEpochAndEnforcesExclusivityAndTheNodeLimit() async throws {
        try await StoreContract.attachRaisesTheEpochAndEnforcesExclusivityAndTheNodeLimit(store)
    }

    func testConcurrentExclusiveAttachesOfOneVolumeHaveExactlyOneWinner() async throws {
        try await StoreContract.concurrentExclusiveAttachesOfOneVolumeHaveExactlyOneWinner(store)
    }

    func testStagesAreKeptPerNode() async throws {
        try await StoreContract.stagesAreKeptPerNode(store)
    }

    func testAReplicaLeavesTheInSyncSetOnlyUnderTheCurrentEpoch() async throws {
        try await StoreContract.aReplicaLeavesTheInSyncSetOnlyUnderTheCurrentEpoch(store)
    }

    func testAReplicaRejoinsRecordsProgressAndIsReplacedOnlyOutOfSync() async throws {
        try await StoreContract.aReplicaRejoinsRecordsProgressAndIsReplacedOnlyOutOfSync(store)
    }

    func testEventsAreKeptNewestLastAndBounded() async throws {
        try await StoreContract.eventsAreKeptNewestLastAndBounded(store)
    }

    func testARemovedNodeCannotRegisterAgain() async throws {
        try await StoreContract.aRemovedNodeCannotRegisterAgain(store)
    }

    func testReplicaDeletionsAreRecordedListedAndRemovedOnlyAsRead() async throws {
        try await StoreContract.replicaDeletionsAreRecordedListedAndRemovedOnlyAsRead(store)
    }

    func testDeletingAVolumeRecordsItsReplicasDeletionsInTheSameStep() async throws {
        try await StoreContract.deletingAVolumeRecordsItsReplicasDeletionsInTheSameStep(store)
    }

    func testRegisteredNodesAreLive() async throws {
        try await StoreContract.registeredNodesAreLive(store)
    }

    func testSnapshotsAreUniqueByNameUpdatedListedInPagesAndDeleted() async throws {
        try await StoreContract.snapshotsAreUniqueByNameUpdatedListedInPagesAndDeleted(store)
    }
}
