import Foundation

// The fuzz targets (docs/fuzzing.md). A target is a name, what it does with one input, and the
// seeds its committed corpus (fuzz/corpus/<name>/) is generated from. Whatever an input does,
// a harness must return: a trap, a hang or an unbounded allocation is a finding.
//
// Adding a target: a `FuzzTarget` value in a file of its own and one entry in `FuzzTarget.all`;
// `fuzz/run` and the corpus test pick it up by name.

public struct FuzzTarget: Sendable {
    public let name: String
    /// Runs one input. Must not trap, hang or allocate in proportion to a length field.
    public let run: @Sendable (UnsafeRawBufferPointer) -> Void
    /// Small valid inputs (file name → bytes), the committed seed corpus.
    public let seeds: @Sendable () -> [(name: String, bytes: [UInt8])]

    public init(name: String, run: @escaping @Sendable (UnsafeRawBufferPointer) -> Void,
                seeds: @escaping @Sendable () -> [(name: String, bytes: [UInt8])]) {
        self.name = name
        self.run = run
        self.seeds = seeds
    }

    /// Runs `bytes` as one input.
    public func run(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { run($0) }
    }

    public static let all: [FuzzTarget] = [FrameFuzz.target, AgentFuzz.target, CSIFuzz.target, RecordFuzz.target, HandshakeFuzz.target]

    public static func named(_ name: String) -> FuzzTarget? { all.first { $0.name == name } }
}

/// The target this process runs: `CAIRN_FUZZ_TARGET` (fuzz/run sets it).
private let selected: FuzzTarget = {
    let name = ProcessInfo.processInfo.environment["CAIRN_FUZZ_TARGET"] ?? ""
    guard let target = FuzzTarget.named(name) else {
        let names = FuzzTarget.all.map(\.name).joined(separator: ", ")
        FileHandle.standardError.write(Data("cairn-fuzz: set CAIRN_FUZZ_TARGET to one of \(names) (got \"\(name)\")\n".utf8))
        exit(2)
    }
    return target
}()

@_cdecl("cairn_fuzz_initialize")
public func cairnFuzzInitialize() {
    _ = selected
}

@_cdecl("cairn_fuzz_one_input")
public func cairnFuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) {
    selected.run(UnsafeRawBufferPointer(start: data, count: size))
}
