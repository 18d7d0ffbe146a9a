// The replica server's second check of an authenticated peer: a node's certificate is not
// enough, the node must be registered in the cluster's store. A node taken out of the store
// (`cairn node remove`) loses access to every replica at its next connection, whatever its
// certificate says. Controllers are not in the store and are not checked here.

import CairnCore
import CairnSecurity
import Dispatch
import Foundation
import Synchronization

public final class PeerMembership: Sendable {
    private let store: any MetadataStore
    private let trustDomain: String
    /// Node ids found registered, and when (answers are kept for `ttl`).
    private let known = Mutex<[String: ContinuousClock.Instant]>([:])
    private let ttl: Duration

    public init(store: any MetadataStore, trustDomain: String, ttl: Duration = .seconds(30)) {
        self.store = store
        self.trustDomain = trustDomain
        self.ttl = ttl
    }

    /// Why `peer` may not connect, or nil. Blocks (at most 3 s) on a store read when the node is
    /// not known yet; a store that does not answer lets a node with a valid certificate in (the
    /// data path must not stop because etcd is slow), and says so.
    public func refusal(of peer: PeerIdentity) -> String? {
        if peer.isController(in: trustDomain) { return nil }
        guard let node = peer.node(in: trustDomain) else { return "it is not a node of trust domain \(trustDomain)" }
        let now = ContinuousClock.now
        if let seen = known.withLock({ $0[node] }), now - seen < ttl { return nil }
        let answer = Mutex<Result<NodeRecord?, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        let store = self.store
        Task {
            let result: Result<NodeRecord?, any Error>
            do { result = .success(try await store.node(id: node)) } catch { result = .failure(error) }
            answer.withLock { $0 = result }
            done.signal()
        }
        guard done.wait(timeout: .now() + 3) == .success, let result = answer.withLock({ $0 }) else { return nil }
        switch result {
        case .success(.some):
            known.withLock { $0[node] = now }
            return nil
        case .success(.none):
            known.withLock { _ = $0.removeValue(forKey: node) }
            return "node \(node) is not registered in the cluster (removed with `cairn node remove`?): its certificate alone does not admit it"
        case .failure:
            return nil
        }
    }
}
