import CairnCore
import CairnRPC
import EtcdProto
import Foundation
import Logging
import Synchronization

/// The cluster metadata store: etcd v3 (Debian's etcd-server is the reference), with the same
/// semantics as `SQLiteStore`.
///
/// Key layout (values are the same JSON documents the SQLite store keeps; ids are validated
/// `[A-Za-z0-9._-]`, other key parts are percent-escaped):
///
///     <prefix>/volumes/<volume id>                         VolumeRecord
///     <prefix>/volume-names/<escaped name>                 the volume id (name uniqueness)
///     <prefix>/attachments/<volume id>/<node id>           AttachmentRecord
///     <prefix>/node-attachments/<node id>/<volume id>      "" (index: a node's attachment count)
///     <prefix>/stages/<node id>/<volume id>                StageRecord
///     <prefix>/publishes/<volume id>/<node id>/<escaped namespace key>/<escaped target path>
///                                                          PublishRecord
///     <prefix>/nodes/<node id>                             NodeRecord, under the node's lease
///     <prefix>/leader                                      the controller holding the leader
///                                                          lease (its id), under that lease
///
/// Every mutation is one etcd transaction. Those that depend on what they read are optimistic:
/// read (remembering each key's mod_revision), decide, then commit with
/// `Compare(mod_revision == seen)` for every key read (0 for a key that must not exist) and
/// `Compare(mod_revision < read revision + 1)` over every range read (no key in it created or
/// changed since); on conflict read again (at most `maxAttempts` times, with jitter).
public final class EtcdStore: MetadataStore, LeaderElection {
    private let client: EtcdClient
    /// Every key of this store lives under it.
    public let prefix: String
    private let logger: Logger
    private let nodeLeaseTTL: Int
    private let state = Mutex(State())
    static let maxAttempts = 20

    private struct State {
        /// Node id → the lease its registration lives under, and the task keeping it alive.
        var nodes: [String: KeptLease] = [:]
        var leader: Leader?
    }

    private struct KeptLease {
        var lease: Int64
        var task: Task<Void, Never>
    }

    private struct Leader {
        var id: String
        var lease: Int64
        /// Leadership is assumed only until here (the last renewal's send time plus the TTL):
        /// after that etcd may have handed the key to someone else.
        var deadline: ContinuousClock.Instant
        var task: Task<Void, Never>?
        var ttl: Int

        /// How often `leadershipLost` looks at the leader key.
        var pollInterval: Duration { .milliseconds(min(max(ttl * 1000 / 3, 200), 1000)) }
    }

    /// - Parameters:
    ///   - endpoints: etcd client URLs, like "http://10.0.0.1:2379", "https://10.0.0.1:2379" or
    ///     "127.0.0.1:2379"; tried in order, failing over when one is unreachable.
    ///   - tls: for https:// endpoints (required then): the CA bundle etcd's certificate must
    ///     verify against, and the client certificate and key when etcd wants one
    ///     (`--client-cert-auth`).
    ///   - prefix: every key lives under it (several Cairn clusters can share one etcd).
    ///   - nodeLeaseTTL: seconds a node's registration outlives its last keep-alive.
    public init(endpoints: [String], tls: TLSCredentials? = nil, prefix: String = "/cairn", nodeLeaseTTL: Int = 10,
                logger: Logger) throws {
        client = try EtcdClient(endpoints: endpoints, tls: tls)
        var prefix = prefix
        while prefix.hasSuffix("/") { prefix.removeLast() }
        guard !prefix.isEmpty else {
            throw CairnError.invalidArgument("the etcd key prefix must not be empty or \"/\": use e.g. /cairn")
        }
        guard nodeLeaseTTL >= 1 else {
            throw CairnError.invalidArgument("the node lease TTL must be at least 1 second, not \(nodeLeaseTTL)")
        }
        self.prefix = prefix
        self.nodeLeaseTTL = nodeLeaseTTL
        self.logger = logger
        logger.debug("etcd metadata store", metadata: ["etcd.endpoints": "\(client.endpointList)", "etcd.prefix": "\(prefix)",
                                                        "etcd.tls": "\(tls.map { "\($0)" } ?? "none")"])
    }

    // MARK: keys

    private var volumesPrefix: String { "\(prefix)/volumes/" }
    private func volumeKey(_ id: String) -> String { volumesPrefix + id }
    private func nameKey(_ name: String) -> String { "\(prefix)/volume-names/\(Self.escape(name))" }
    private func attachmentsPrefix(_ volumeID: String) -> String { "\(prefix)/attachments/\(volumeID)/" }
    private func attachmentKey(_ volumeID: String, _ nodeID: String) -> String { attachmentsPrefix(volumeID) + nodeID }
    private func nodeAttachmentsPrefix(_ nodeID: String) -> String { "\(prefix)/node-attachments/\(nodeID)/" }
    private func nodeAttachmentKey(_ nodeID: String, _ volumeID: String) -> String { nodeAttachmentsPrefix(nodeID) + volumeID }
    private var stagesPrefix: String { "\(prefix)/stages/" }
    private func stageKey(_ volumeID: String, _ nodeID: String) -> String { "\(stagesPrefix)\(nodeID)/\(volumeID)" }
    private func publishesPrefix(_ volumeID: String) -> String { "\(prefix)/publishes/\(volumeID)/" }
    private func publishKey(_ r: PublishRecord) -> String {
        publishesPrefix(r.volumeID) + "\(r.nodeID)/\(Self.escape(r.namespace.key))/\(Self.escape(r.targetPath))"
    }
    private var nodesPrefix: String { "\(prefix)/nodes/" }
    private var removedNodesPrefix: String { "\(prefix)/removed-nodes/" }
    private func nodeKey(_ id: String) -> String { nodesPrefix + id }
    private var leaderKey: String { "\(prefix)/leader" }
    private var replicaDeletionsPrefix: String { "\(prefix)/replica-deletions/" }
    private func replicaDeletionKey(_ nodeID: String, _ volumeID: String) -> String {
        "\(replicaDeletionsPrefix)\(nodeID)/\(volumeID)"
    }

    /// Percent-escapes everything but `[A-Za-z0-9._-]`, so no key part contains a "/".
    static func escape(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }

    // MARK: reading and writing

    private func decode<T: Decodable>(_ type: T.Type, _ kv: Etcdserverpb_KeyValue) throws -> T {
        do {
            return try StoreRules.decode(type, kv.value)
        } catch {
            throw CairnError.internal("etcd key \(String(decoding: kv.key, as: UTF8.self)) holds an undecodable \(T.self): \(error)")
        }
    }

    private func get<T: Decodable>(_ type: T.Type, _ key: String) async throws -> T? {
        try await StoreMetrics.timed("etcd", "get") { try await client.get(key) }.kv.map { try decode(type, $0) }
    }

    private func list<T: Decodable>(_ type: T.Type, prefix: String) async throws -> [T] {
        try await StoreMetrics.timed("etcd", "range") {
            try await client.range(from: prefix, end: EtcdClient.prefixEnd(prefix))
        }.kvs.map { try decode(type, $0) }
    }

    /// Commits `ops` as one transaction with no condition.
    private func write(_ ops: [Etcdserverpb_RequestOp]) async throws {
        var request = Etcdserverpb_TxnRequest()
        request.success = ops
        _ = try await StoreMetrics.timed("etcd", "write") { try await client.txn(request) }
    }

    /// Runs `body` (reads through the transaction, then queues writes) and commits it if nothing
    /// it read changed meanwhile; otherwise runs it again. A body that queues no write commits
    /// nothing.
    private func transact<T>(_ what: String, _ body: (EtcdTransaction) async throws -> T) async throws -> T {
        // One sample per transaction, its retries included: what the caller waited.
        let began = MetricsClock.now()
        defer { StoreMetrics.transactions.record(["etcd", "txn"], since: began) }
        for attempt in 1...Self.maxAttempts {
            let txn = EtcdTransaction(client: client)
            let result = try await body(txn)
            if try await txn.commit() { return result }
            StoreMetrics.conflicts.increment(["etcd"])
            logger.debug("etcd transaction conflicted; retrying", metadata: ["operation": "\(what)", "attempt": "\(attempt)"])
            try await Task.sleep(for: .milliseconds(Int.random(in: 5...(10 + 10 * attempt))))
        }
        throw CairnError.aborted("\(what): the records changed concurrently \(Self.maxAttempts) times in a row; retry")
    }

    // MARK: nodes

    /// Registers (or refreshes) the node under a lease of `nodeLeaseTTL` seconds and keeps the
    /// lease alive in the background until `stop()`. When the lease is lost (etcd unreachable
    /// for longer than the TTL) the node is registered again as soon as etcd answers.
    public func registerNode(_ node: NodeRecord) async throws {
        let lease = try await client.grantLease(ttl: nodeLeaseTTL)
        guard try await putUnlessRemoved(node, lease: lease) else {
            try? await client.revokeLease(lease)
            throw StoreRules.nodeRemoved(node.id)
        }
        let task = Task { await self.keepNodeRegistered(node, lease: lease) }
        let previous = state.withLock { state in
            defer { state.nodes[node.id] = KeptLease(lease: lease, task: task) }
            return state.nodes[node.id]
        }
        if let previous {
            previous.task.cancel()
            try? await client.revokeLease(previous.lease)
        }
        logger.info("node registered", metadata: ["node": "\(node.id)", "lease.ttl": "\(nodeLeaseTTL)s"])
    }

    private func keepNodeRegistered(_ node: NodeRecord, lease: Int64) async {
        var lease = lease
        let what = "node \(node.id)'s registration"
        while !Task.isCancelled {
            await keepAlive(lease: lease, ttl: nodeLeaseTTL, what: what) { _ in }
            if Task.isCancelled { return }
            logger.warning("\(what) expired (etcd was unreachable for longer than its \(nodeLeaseTTL)s lease); registering it again")
            while !Task.isCancelled {
                do {
                    let fresh = try await client.grantLease(ttl: nodeLeaseTTL)
                    guard try await putUnlessRemoved(node, lease: fresh) else {
                        try? await client.revokeLease(fresh)
                        logger.error("this node was removed from the cluster (cairn node remove) while its registration lapsed; it stays unregistered — give the machine a new --node-id to bring it back",
                                     metadata: ["node": "\(node.id)"])
                        return
                    }
                    lease = fresh
                    state.withLock { $0.nodes[node.id]?.lease = fresh }
                    logger.notice("node registered again after its lease expired", metadata: ["node": "\(node.id)"])
                    break
                } catch {
                    logger.debug("registering the node again failed; retrying", metadata: ["node": "\(node.id)", "error": "\(error)"])
                    try? await Task.sleep(for: .seconds(1))
                }
            }
        }
    }

    /// Renews `lease` every third of its TTL until etcd says it is gone (returns) or the task is
    /// cancelled (returns). `renewed` gets the local deadline each renewal guarantees.
    private func keepAlive(lease: Int64, ttl: Int, what: String,
                           renewed: (ContinuousClock.Instant) -> Void) async {
        let interval = Duration.milliseconds(max(ttl * 1000 / 3, 200))
        var failing = false
        while !Task.isCancelled {
            let sent = ContinuousClock.now
            do {
                let left = try await client.keepAlive(lease: lease)
                if left <= 0 { return }
                if failing {
                    logger.notice("\(what): etcd answers again; lease renewed")
                    failing = false
                }
                renewed(sent + .seconds(left))
            } catch {
                if !failing {
                    logger.warning("\(what): cannot renew its etcd lease; retrying every \(interval)", metadata: ["error": "\(error)"])
                    failing = true
                }
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// The registration, in one transaction with "the node was not removed": a removal racing
    /// a registration either lands first (the registration fails) or deletes it.
    private func putUnlessRemoved(_ node: NodeRecord, lease: Int64) async throws -> Bool {
        var request = Etcdserverpb_TxnRequest()
        request.compare = [.mustNotExist(removedNodesPrefix + node.id)]
        request.success = [.put(nodeKey(node.id), try StoreRules.encode(node), lease: lease)]
        return try await client.txn(request).succeeded
    }

    public func node(id: String) async throws -> NodeRecord? {
        try await get(NodeRecord.self, nodeKey(id))
    }

    public func liveNodes() async throws -> [NodeRecord] {
        try await list(NodeRecord.self, prefix: nodesPrefix)
    }

    public func removeNode(id: String) async throws {
        let stamp = try StoreRules.encode(["removedAt": Date().timeIntervalSince1970])
        try await write([.put(removedNodesPrefix + id, stamp), .delete(nodeKey(id))])
        logger.notice("node removed", metadata: ["node": "\(id)"])
    }

    public func removedNodes() async throws -> [String] {
        try await client.range(from: removedNodesPrefix, end: EtcdClient.prefixEnd(removedNodesPrefix), keysOnly: true)
            .kvs.map { String(decoding: $0.key, as: UTF8.self).dropFirst(removedNodesPrefix.count) }.map(String.init).sorted()
    }

    // MARK: leader lease

    /// Returns once this process holds the leader key `<prefix>/leader` under a lease of `ttl`
    /// seconds, which it then keeps alive until `stop()`. While another holds it, polls every
    /// second (logging who leads); while etcd is unreachable, keeps trying (logging it).
    /// Cancelling the calling task ends the wait with CancellationError.
    public func campaign(leaderID: String, ttl: Int = 10) async throws {
        guard ttl >= 1 else { throw CairnError.invalidArgument("the leader lease TTL must be at least 1 second, not \(ttl)") }
        if state.withLock({ $0.leader?.id == leaderID }), isLeader() { return }
        var seen: String?
        var unreachable = false
        while true {
            try Task.checkCancellation()
            do {
                if let current = try await client.get(leaderKey).kv {
                    let holder = String(decoding: current.value, as: UTF8.self)
                    if holder != seen {
                        logger.info("waiting for the leader lease", metadata: ["leader": "\(holder)", "candidate": "\(leaderID)"])
                        seen = holder
                    }
                } else if try await tryToLead(leaderID: leaderID, ttl: ttl) {
                    return
                }
                unreachable = false
            } catch let e as CairnError where e.code == .unavailable {
                if !unreachable {
                    logger.warning("campaigning for the leader lease: etcd is unreachable; retrying", metadata: ["error": "\(e.message)"])
                    unreachable = true
                }
            }
            try await Task.sleep(for: .seconds(1))
        }
    }

    private func tryToLead(leaderID: String, ttl: Int) async throws -> Bool {
        let start = ContinuousClock.now
        let lease = try await client.grantLease(ttl: ttl)
        var request = Etcdserverpb_TxnRequest()
        request.compare = [.mustNotExist(leaderKey)]
        request.success = [.put(leaderKey, Data(leaderID.utf8), lease: lease)]
        guard try await client.txn(request).succeeded else {
            try? await client.revokeLease(lease)
            return false
        }
        state.withLock { $0.leader = Leader(id: leaderID, lease: lease, deadline: start + .seconds(ttl), ttl: ttl) }
        let task = Task {
            await self.keepAlive(lease: lease, ttl: ttl, what: "the leader lease of \(leaderID)") { deadline in
                self.state.withLock { if $0.leader?.lease == lease { $0.leader?.deadline = deadline } }
            }
            if Task.isCancelled { return }
            self.state.withLock { if $0.leader?.lease == lease { $0.leader = nil } }
            self.logger.error("lost the leader lease (etcd was unreachable for longer than its \(ttl)s TTL); no longer leading",
                              metadata: ["leader": "\(leaderID)"])
        }
        state.withLock { if $0.leader?.lease == lease { $0.leader?.task = task } }
        logger.notice("holding the leader lease", metadata: ["leader": "\(leaderID)", "lease.ttl": "\(ttl)s"])
        return true
    }

    /// Whether this process holds the leader lease now: it won a campaign, and its last renewal
    /// guarantees the lease has not expired yet.
    public func isLeader() -> Bool {
        state.withLock { state in state.leader.map { ContinuousClock.now < $0.deadline } ?? false }
    }

    /// Polls (every third of the lease's TTL, at least every second) until this process no longer
    /// holds the leader lease it won as `leaderID`: the keep-alive found the lease gone, the last
    /// renewal's deadline passed (etcd unreachable for longer than the TTL: another candidate may
    /// lead by now), or `<prefix>/leader` was deleted or is under another lease.
    public func leadershipLost(leaderID: String) async throws -> String {
        while true {
            try Task.checkCancellation()
            guard let held = state.withLock({ $0.leader }), held.id == leaderID else {
                return "the lease expired: etcd did not renew it (unreachable for longer than its TTL, or it was revoked)"
            }
            guard ContinuousClock.now < held.deadline else {
                return "no renewal within the lease's TTL (etcd unreachable): another controller may lead by now"
            }
            do {
                // Bounded by the deadline: a hung etcd must not keep a lapsed leader acting.
                let left = held.deadline - ContinuousClock.now
                let kv = try await client.get(leaderKey, timeout: max(min(left, .seconds(5)), .milliseconds(100))).kv
                if kv == nil { return "the leader key \(leaderKey) was deleted" }
                if let kv, kv.lease != held.lease {
                    return "the leader key \(leaderKey) is held by \(String(decoding: kv.value, as: UTF8.self)) under another lease"
                }
            } catch let error as CairnError where error.code == .unavailable {
                // The deadline above decides: a short outage within the TTL keeps the lease.
            }
            try await Task.sleep(for: held.pollInterval)
        }
    }

    /// Gives up the leader lease won as `leaderID`: stops its keep-alive and revokes it, so the
    /// key goes at once and a standby's next poll wins it.
    public func resign(leaderID: String) async {
        let held = state.withLock { state -> Leader? in
            guard let leader = state.leader, leader.id == leaderID else { return nil }
            state.leader = nil
            return leader
        }
        guard let held else { return }
        held.task?.cancel()
        await held.task?.value
        do { try await client.revokeLease(held.lease) } catch {
            logger.warning("could not revoke the leader lease; it expires by itself", metadata: ["error": "\(error)"])
        }
        logger.notice("gave up the leader lease", metadata: ["leader": "\(leaderID)"])
    }

    /// Stops every keep-alive. With `revokingLeases` (the default) it also revokes the leases,
    /// so node registrations and the leader key go away at once instead of after their TTL.
    public func stop(revokingLeases: Bool = true) async {
        let (nodes, leader) = state.withLock { state in
            defer { state = State() }
            return (state.nodes, state.leader)
        }
        var leases: [Int64] = []
        for kept in nodes.values {
            kept.task.cancel()
            await kept.task.value
            leases.append(kept.lease)
        }
        if let leader {
            leader.task?.cancel()
            await leader.task?.value
            leases.append(leader.lease)
            logger.notice("gave up the leader lease", metadata: ["leader": "\(leader.id)"])
        }
        guard revokingLeases else { return }
        for lease in leases {
            do { try await client.revokeLease(lease) } catch {
                logger.warning("could not revoke an etcd lease; it expires by itself", metadata: ["error": "\(error)"])
            }
        }
    }

    // MARK: volumes

    public func createVolume(_ volume: VolumeRecord) async throws {
        let doc = try StoreRules.encode(volume)
        try await transact("create volume \(volume.id)") { txn in
            let byID = try await txn.get(volumeKey(volume.id))
            let byName = try await txn.get(nameKey(volume.name))
            if byID != nil || byName != nil {
                throw CairnError.alreadyExists("a volume named \"\(volume.name)\" or with id \(volume.id) already exists")
            }
            txn.put(volumeKey(volume.id), doc)
            txn.put(nameKey(volume.name), Data(volume.id.utf8))
        }
    }

    public func volume(id: String) async throws -> VolumeRecord? {
        try await get(VolumeRecord.self, volumeKey(id))
    }

    public func volume(named name: String) async throws -> VolumeRecord? {
        guard let id = try await client.get(nameKey(name)).kv else { return nil }
        guard let volume = try await volume(id: String(decoding: id.value, as: UTF8.self)), volume.name == name else {
            return nil  // deleted (and maybe the name reused) between the two reads
        }
        return volume
    }

    public func listVolumes(afterID: String?, limit: Int) async throws -> [VolumeRecord] {
        let from = afterID.map { volumeKey($0) + "\0" } ?? volumesPrefix
        return try await client.range(from: from, end: EtcdClient.prefixEnd(volumesPrefix), limit: max(limit, 0))
            .kvs.map { try decode(VolumeRecord.self, $0) }
    }

    public func deleteVolume(id: String, recordingReplicaDeletions replicaDeletions: [ReplicaDeletion]) async throws {
        let deletions = try replicaDeletions.map { (replicaDeletionKey($0.nodeID, $0.volumeID), try StoreRules.encode($0)) }
        let existed = try await transact("delete volume \(id)") { txn in
            let volume = try await txn.get(volumeKey(id)).map { try decode(VolumeRecord.self, $0) }
            let attachments = try await txn.range(attachmentsPrefix(id)).map { try decode(AttachmentRecord.self, $0) }
            // Stages are keyed by node first: find this volume's among them.
            let stageKeys = try await client.range(from: stagesPrefix, end: EtcdClient.prefixEnd(stagesPrefix), keysOnly: true)
                .kvs.map { String(decoding: $0.key, as: UTF8.self) }.filter { $0.hasSuffix("/\(id)") }
            txn.delete(volumeKey(id))
            if let volume { txn.delete(nameKey(volume.name)) }
            txn.deletePrefix(attachmentsPrefix(id))
            for attachment in attachments { txn.delete(nodeAttachmentKey(attachment.nodeID, id)) }
            for key in stageKeys { txn.delete(key) }
            txn.deletePrefix(publishesPrefix(id))
            for (key, doc) in deletions { txn.put(key, doc) }
            return volume != nil
        }
        if existed { logger.info("volume deleted from the store", metadata: ["volume": "\(id)"]) }
    }

    // MARK: replica deletions

    public func recordReplicaDeletions(_ deletions: [ReplicaDeletion]) async throws {
        guard !deletions.isEmpty else { return }
        try await write(try deletions.map { .put(replicaDeletionKey($0.nodeID, $0.volumeID), try StoreRules.encode($0)) })
    }

    public func replicaDeletions(nodeID: String?) async throws -> [ReplicaDeletion] {
        try await list(ReplicaDeletion.self, prefix: replicaDeletionsPrefix + (nodeID.map { "\($0)/" } ?? ""))
            .sorted { ($0.nodeID, $0.volumeID) < ($1.nodeID, $1.volumeID) }
    }

    public func removeReplicaDeletion(nodeID: String, volumeID: String, token: String?) async throws {
        let key = replicaDeletionKey(nodeID, volumeID)
        guard let token else { return try await write([.delete(key)]) }
        try await transact("remove the pending deletion of node \(nodeID)'s replica of volume \(volumeID)") { txn in
            guard let kv = try await txn.get(key), try decode(ReplicaDeletion.self, kv).token == token else { return }
            txn.delete(key)
        }
    }

    public func provisionedBytes() async throws -> Int64 {
        try await list(VolumeRecord.self, prefix: volumesPrefix).reduce(0) { $0 + $1.capacityBytes }
    }

    // MARK: attachments

    public func attachments(volumeID: String) async throws -> [AttachmentRecord] {
        try await list(AttachmentRecord.self, prefix: attachmentsPrefix(volumeID))
    }

    public func attach(volumeID: String, nodeID: String, readonly: Bool, accessMode: Int,
                       exclusive: Bool, nodeLimit: Int64, signer: (any ClaimSigner)?) async throws -> AttachmentRecord {
        try await transact("attach volume \(volumeID) to node \(nodeID)") { txn in
            guard var volume = try await txn.get(volumeKey(volumeID)).map({ try decode(VolumeRecord.self, $0) }) else {
                throw StoreRules.volumeNotFound(volumeID)
            }
            let existing = try await txn.range(attachmentsPrefix(volumeID)).map { try decode(AttachmentRecord.self, $0) }
            let onNode = nodeLimit > 0 ? Int64(try await txn.range(nodeAttachmentsPrefix(nodeID)).count) : 0
            try StoreRules.checkAttach(volumeID: volumeID, nodeID: nodeID, volumeAttachments: existing,
                                       attachedToNode: onNode, exclusive: exclusive, nodeLimit: nodeLimit)
            volume.epoch = volume.epoch.next
            let attachment = AttachmentRecord(volumeID: volumeID, nodeID: nodeID, readonly: readonly,
                                              accessMode: accessMode, epoch: volume.epoch,
                                              grant: try signer?.grant(volumeID: volumeID, nodeID: nodeID, epoch: volume.epoch))
            txn.put(volumeKey(volumeID), try StoreRules.encode(volume))
            txn.put(attachmentKey(volumeID, nodeID), try StoreRules.encode(attachment))
            txn.put(nodeAttachmentKey(nodeID, volumeID), Data())
            return attachment
        }
    }

    public func detach(volumeID: String, nodeID: String) async throws {
        try await write([.delete(attachmentKey(volumeID, nodeID)), .delete(nodeAttachmentKey(nodeID, volumeID))])
    }

    // MARK: replicas

    public func markReplicaOutOfSync(volumeID: String, nodeID: String, epoch: FencingEpoch, reason: String) async throws {
        let changed = try await transact("mark replica \(nodeID) of volume \(volumeID) out of sync") { txn in
            guard var volume = try await txn.get(volumeKey(volumeID)).map({ try decode(VolumeRecord.self, $0) }) else {
                throw StoreRules.volumeNotFound(volumeID)
            }
            guard try volume.markReplicaOutOfSync(nodeID: nodeID, epoch: epoch, reason: reason) else { return false }
            txn.put(volumeKey(volumeID), try StoreRules.encode(volume))
            return true
        }
        if changed {
            logger.notice("replica left the in-sync set", metadata: [
                "volume": "\(volumeID)", "replica.node": "\(nodeID)", "epoch": "\(epoch)", "reason": "\(reason)"])
        }
    }

    public func updateVolume(id: String, what: String,
                             _ change: @escaping @Sendable (inout VolumeRecord) throws -> Bool) async throws -> Bool {
        try await transact(what) { txn in
            guard var volume = try await txn.get(volumeKey(id)).map({ try decode(VolumeRecord.self, $0) }) else {
                throw StoreRules.volumeNotFound(id)
            }
            guard try change(&volume) else { return false }
            txn.put(volumeKey(id), try StoreRules.encode(volume))
            return true
        }
    }

    // MARK: snapshots and group snapshots

    // <prefix>/snapshots/<id> holds the record, <prefix>/snapshot-names/<escaped name> the id
    // (name uniqueness), the same shape as volumes; group snapshots likewise under
    // group-snapshots/ and group-snapshot-names/.
    private struct NamedKind {
        let records: String
        let names: String
        let what: String
    }

    private var snapshotKind: NamedKind { NamedKind(records: "\(prefix)/snapshots/", names: "\(prefix)/snapshot-names/", what: "snapshot") }
    private var groupKind: NamedKind {
        NamedKind(records: "\(prefix)/group-snapshots/", names: "\(prefix)/group-snapshot-names/", what: "group snapshot")
    }

    private func insertNamed(_ kind: NamedKind, id: String, name: String, _ doc: Data) async throws {
        try await transact("create \(kind.what) \(id)") { txn in
            let byID = try await txn.get(kind.records + id)
            let byName = try await txn.get(kind.names + Self.escape(name))
            if byID != nil || byName != nil {
                throw CairnError.alreadyExists("a \(kind.what) named \"\(name)\" or with id \(id) already exists")
            }
            txn.put(kind.records + id, doc)
            txn.put(kind.names + Self.escape(name), Data(id.utf8))
        }
    }

    private func updateNamed(_ kind: NamedKind, id: String, _ doc: Data) async throws {
        try await transact("update \(kind.what) \(id)") { txn in
            guard try await txn.get(kind.records + id) != nil else { throw CairnError.notFound("\(kind.what) \(id) does not exist") }
            txn.put(kind.records + id, doc)
        }
    }

    private func named<T: Decodable>(_ type: T.Type, _ kind: NamedKind, name: String, nameOf: (T) -> String) async throws -> T? {
        guard let key = try await client.get(kind.names + Self.escape(name)).kv else { return nil }
        guard let record = try await get(type, kind.records + String(decoding: key.value, as: UTF8.self)), nameOf(record) == name else {
            return nil  // deleted (and maybe the name reused) between the two reads
        }
        return record
    }

    private func deleteNamed<T: Decodable>(_ type: T.Type, _ kind: NamedKind, id: String, nameOf: @escaping (T) -> String) async throws {
        try await transact("delete \(kind.what) \(id)") { txn in
            guard let record = try await txn.get(kind.records + id).map({ try decode(type, $0) }) else { return }
            txn.delete(kind.records + id)
            txn.delete(kind.names + Self.escape(nameOf(record)))
        }
    }

    public func createSnapshot(_ snapshot: SnapshotRecord) async throws {
        try await insertNamed(snapshotKind, id: snapshot.id, name: snapshot.name, try StoreRules.encode(snapshot))
    }

    public func updateSnapshot(_ snapshot: SnapshotRecord) async throws {
        try await updateNamed(snapshotKind, id: snapshot.id, try StoreRules.encode(snapshot))
    }

    public func snapshot(id: String) async throws -> SnapshotRecord? {
        try await get(SnapshotRecord.self, snapshotKind.records + id)
    }

    public func snapshot(named name: String) async throws -> SnapshotRecord? {
        try await named(SnapshotRecord.self, snapshotKind, name: name, nameOf: \.name)
    }

    public func listSnapshots(afterID: String?, limit: Int) async throws -> [SnapshotRecord] {
        let records = snapshotKind.records
        let from = afterID.map { records + $0 + "\0" } ?? records
        return try await client.range(from: from, end: EtcdClient.prefixEnd(records), limit: max(limit, 0))
            .kvs.map { try decode(SnapshotRecord.self, $0) }
    }

    public func deleteSnapshot(id: String) async throws {
        try await deleteNamed(SnapshotRecord.self, snapshotKind, id: id, nameOf: \.name)
    }

    public func createGroupSnapshot(_ group: GroupSnapshotRecord) async throws {
        try await insertNamed(groupKind, id: group.id, name: group.name, try StoreRules.encode(group))
    }

    public func updateGroupSnapshot(_ group: GroupSnapshotRecord) async throws {
        try await updateNamed(groupKind, id: group.id, try StoreRules.encode(group))
    }

    public func groupSnapshot(id: String) async throws -> GroupSnapshotRecord? {
        try await get(GroupSnapshotRecord.self, groupKind.records + id)
    }

    public func groupSnapshot(named name: String) async throws -> GroupSnapshotRecord? {
        try await named(GroupSnapshotRecord.self, groupKind, name: name, nameOf: \.name)
    }

    public func deleteGroupSnapshot(id: String) async throws {
        try await deleteNamed(GroupSnapshotRecord.self, groupKind, id: id, nameOf: \.name)
    }

    // MARK: node-side records

    public func stage(volumeID: String, nodeID: String) async throws -> StageRecord? {
        try await get(StageRecord.self, stageKey(volumeID, nodeID))
    }

    public func stages(nodeID: String) async throws -> [StageRecord] {
        try await list(StageRecord.self, prefix: "\(stagesPrefix)\(nodeID)/")
    }

    public func putStage(_ record: StageRecord) async throws {
        try await write([.put(stageKey(record.volumeID, record.nodeID), try StoreRules.encode(record))])
    }

    public func removeStage(volumeID: String, nodeID: String) async throws {
        try await write([.delete(stageKey(volumeID, nodeID))])
    }

    public func publishes(volumeID: String) async throws -> [PublishRecord] {
        try await list(PublishRecord.self, prefix: publishesPrefix(volumeID)).sorted { $0.targetPath < $1.targetPath }
    }

    public func putPublish(_ record: PublishRecord) async throws {
        try await write([.put(publishKey(record), try StoreRules.encode(record))])
    }

    public func removePublish(_ record: PublishRecord) async throws {
        try await write([.delete(publishKey(record))])
    }
}

/// One optimistic transaction: reads go to etcd at once and add the conditions under which
/// what they saw still holds; writes are queued and sent, with those conditions, by `commit`.
final class EtcdTransaction {
    private let client: EtcdClient
    private var compares: [Etcdserverpb_Compare] = []
    private var ops: [Etcdserverpb_RequestOp] = []

    init(client: EtcdClient) { self.client = client }

    /// The key's current value; the commit requires it unchanged (or still absent).
    func get(_ key: String) async throws -> Etcdserverpb_KeyValue? {
        let kv = try await client.get(key).kv
        var compare = Etcdserverpb_Compare()
        compare.key = Data(key.utf8)
        compare.target = .mod
        compare.result = .equal
        compare.modRevision = kv?.modRevision ?? 0  // an absent key compares as mod_revision 0
        compares.append(compare)
        return kv
    }

    /// Every key under `prefix`; the commit requires that none was created or changed since.
    /// (Deletions are not detected: the callers' decisions only get easier when keys go away.)
    func range(_ prefix: String) async throws -> [Etcdserverpb_KeyValue] {
        let (kvs, revision) = try await client.range(from: prefix, end: EtcdClient.prefixEnd(prefix))
        var compare = Etcdserverpb_Compare()
        compare.key = Data(prefix.utf8)
        compare.rangeEnd = EtcdClient.prefixEnd(prefix)
        compare.target = .mod
        compare.result = .less
        compare.modRevision = revision + 1
        compares.append(compare)
        return kvs
    }

    func put(_ key: String, _ value: Data) { ops.append(.put(key, value)) }
    func delete(_ key: String) { ops.append(.delete(key)) }
    func deletePrefix(_ prefix: String) { ops.append(.delete(prefix, rangeEnd: EtcdClient.prefixEnd(prefix))) }

    /// Sends the queued writes if every condition holds. True when committed (or nothing to do).
    func commit() async throws -> Bool {
        guard !ops.isEmpty else { return true }
        var request = Etcdserverpb_TxnRequest()
        request.compare = compares
        request.success = ops
        return try await client.txn(request).succeeded
    }
}

extension Etcdserverpb_RequestOp {
    static func put(_ key: String, _ value: Data, lease: Int64 = 0) -> Self {
        var put = Etcdserverpb_PutRequest()
        put.key = Data(key.utf8)
        put.value = value
        put.lease = lease
        var op = Self()
        op.requestPut = put
        return op
    }

    static func delete(_ key: String, rangeEnd: Data? = nil) -> Self {
        var delete = Etcdserverpb_DeleteRangeRequest()
        delete.key = Data(key.utf8)
        if let rangeEnd { delete.rangeEnd = rangeEnd }
        var op = Self()
        op.requestDeleteRange = delete
        return op
    }
}

extension Etcdserverpb_Compare {
    /// Holds when the key does not exist.
    static func mustNotExist(_ key: String) -> Self {
        var compare = Self()
        compare.key = Data(key.utf8)
        compare.target = .create
        compare.result = .equal
        compare.createRevision = 0
        return compare
    }
}
