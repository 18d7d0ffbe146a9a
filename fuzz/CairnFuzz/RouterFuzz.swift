import CairnCore
import CairnRPC
import Dispatch
import Logging
import SwiftProtobuf

/// What the `agent` and `csi` targets share: a gRPC method table (`Router`, where the plugin
/// decodes every request) driven with one input. The first byte picks the method (its index in
/// the sorted method names, modulo their count); the rest is the serialized request, handed to
/// the method's handler exactly as the gRPC server hands it over.
struct RouterFuzz: Sendable {
    let router: Router
    let methods: [String]

    /// What the services under fuzz log to: nothing.
    static let logger = Logger(label: "cairn.fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
    /// The node the services run as, and the one directory their paths may lie under.
    static let nodeID = "fuzz-node"
    static let pathRoot = "/var/lib/kubelet"

    init(_ router: Router) {
        self.router = router
        methods = router.methods
        precondition(!methods.isEmpty, "no method registered")
    }

    func run(_ input: UnsafeRawBufferPointer) {
        guard let selector = input.first else { return }
        let method = methods[Int(selector) % methods.count]
        guard let handler = router.handler(for: method) else { return }
        let request = Array(input.dropFirst())
        let context = RPCContext(method: method, deadline: nil, logger: Self.logger)
        Self.runToEnd {
            do {
                _ = try await handler(request, context)
            } catch {
                // The status the client would get: every error must map to one.
                _ = RPCStatus.from(error)
            }
        }
    }

    /// A seed named after the method (and `variant`).
    func seed(_ method: String, _ request: some SwiftProtobuf.Message, _ variant: String = "") -> (name: String, bytes: [UInt8]) {
        ((method.split(separator: "/").last.map(String.init) ?? method) + variant, input(method, request))
    }

    /// An input: the method's index and the request's bytes.
    func input(_ method: String, _ request: some SwiftProtobuf.Message) -> [UInt8] {
        guard let index = methods.firstIndex(of: method) else { preconditionFailure("no method \(method)") }
        // Map entries in key order, so the committed seeds are the same bytes on every run.
        var options = BinaryEncodingOptions()
        options.useDeterministicOrdering = true
        // Only fails for a message with missing required fields; CSI and the agent protocol are proto3.
        let bytes: [UInt8] = try! request.serializedBytes(options: options)
        return [UInt8(index)] + bytes
    }

    /// Runs `body` to completion from libFuzzer's synchronous callback. A handler that never
    /// returns is a hang, which libFuzzer's -timeout reports.
    static func runToEnd(_ body: @escaping @Sendable () async -> Void) {
        let done = DispatchSemaphore(value: 0)
        Task {
            await body()
            done.signal()
        }
        done.wait()
    }
}
