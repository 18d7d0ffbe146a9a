import ArgumentParser
import CSIProto
import Foundation

/// How the control plane's cost grows with the number of volumes: N small volumes created one
/// after the other; after every bucket of them the CreateVolume latencies of that bucket, a full
/// ListVolumes (paginated as a CO pages, and in one call), GetCapacity, and what `--probe`
/// prints (bench/run: etcd's database size and key count). Then every volume is deleted, timed.
/// The volumes are deleted also when a step fails.
struct Scale: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create N volumes in buckets (CreateVolume p50/p99 per bucket, ListVolumes, GetCapacity, a probe), then delete them all.")

    @Option(help: "The controller's CSI endpoint (unix:///…).") var controller: String
    @Option(help: "How many volumes.") var count: Int = 1000
    @Option(help: "Volumes per bucket (a measurement after each).") var bucket: Int = 100
    @Option(name: .customLong("size-mib"), help: "Volume size in MiB.") var sizeMiB: Int64 = 16
    @Option(help: "Replicas per volume.") var replicas: Int = 1
    @Option(help: "ListVolumes max_entries when paging, as a CO would.") var pageSize: Int32 = 100
    @Option(help: "GetCapacity calls per measurement.") var capacityCalls: Int = 5
    @Option(help: "A shell command run after each bucket; its stdout (JSON if it parses) goes into the bucket's entry.")
    var probe: String?
    @Option(help: "Where the JSON result goes.") var out: String
    @Option(help: "Volume name prefix.") var name: String = "bench-scale"

    func run() async throws {
        let controller = CSIClient(endpoint: self.controller)
        var created: [String] = []
        var buckets: [[String: Any]] = []
        var allCreates = Samples()
        var failure: String?
        var result: [String: Any] = [
            "count": count, "bucket": bucket, "size_mib": sizeMiB, "replicas": replicas, "page_size": pageSize,
        ]
        do {
            if let initial = probeOutput() { result["probe_before"] = initial }
            var bucketCreates = Samples()
            for i in 0..<count {
                let id = try await bucketCreates.time {
                    try await createVolume(controller, name: "\(name)-\(i)-\(UUID().uuidString.prefix(8))",
                                           bytes: sizeMiB << 20, replicas: replicas)
                }
                created.append(id)
                guard (i + 1) % bucket == 0 || i + 1 == count else { continue }
                allCreates.ms += bucketCreates.ms
                var entry: [String: Any] = ["volumes": i + 1, "create_volume": bucketCreates.summary]
                entry.merge(try await listAndCapacity(controller, expected: created.count)) { $1 }
                if let probed = probeOutput() { entry["probe"] = probed }
                buckets.append(entry)
                log("scale: \(i + 1) volumes, CreateVolume p50 \(fmt(bucketCreates.percentile(50))) ms p99 \(fmt(bucketCreates.percentile(99))) ms, ListVolumes (paged) \(fmt(entry["list_paginated_ms"] as? Double)) ms")
                bucketCreates = Samples()
            }
        } catch {
            failure = "\(error)"
            log("scale: failed after \(created.count) volumes: \(error); deleting them")
        }
        // Delete everything made, in creation order, timed; keep going past a failed delete so
        // none is left behind.
        var deletes = Samples()
        var deleteFailures: [String] = []
        let deleteStart = ContinuousClock.now
        for id in created {
            do {
                try await deletes.time { try await deleteVolume(controller, id) }
            } catch {
                deleteFailures.append("\(id): \(error)")
            }
        }
        let deleteTotal = milliseconds(ContinuousClock.now - deleteStart)
        if let after = probeOutput() { result["probe_after_delete"] = after }
        result["buckets"] = buckets
        result["created"] = created.count
        result["create_volume"] = allCreates.summary
        result["delete_volume"] = deletes.summary
        result["delete_all_ms"] = deleteTotal
        result["samples_ms"] = ["create_volume": allCreates.ms, "delete_volume": deletes.ms]
        if !deleteFailures.isEmpty { result["delete_failures"] = deleteFailures }
        if let failure { result["error"] = failure }
        try writeJSON(result, to: out)
        log("scale: deleted \(deletes.ms.count) of \(created.count) volumes in \(fmt(deleteTotal)) ms (DeleteVolume p50 \(fmt(deletes.percentile(50))) ms)")
        if let failure { throw BenchError("scale: \(failure)") }
        if !deleteFailures.isEmpty {
            throw BenchError("scale: \(deleteFailures.count) DeleteVolume call(s) failed, first: \(deleteFailures[0])")
        }
    }

    /// A full ListVolumes, paged and in one call, and GetCapacity; the list must hold `expected`
    /// volumes at least (another client's volumes may be there too).
    func listAndCapacity(_ controller: CSIClient, expected: Int) async throws -> [String: Any] {
        var pages = Samples()
        var token = ""
        var listed = 0
        let start = ContinuousClock.now
        repeat {
            var r = Csi_V1_ListVolumesRequest()
            r.maxEntries = pageSize
            r.startingToken = token
            let page = try await pages.time {
                try await controller.call("Controller", "ListVolumes", r, as: Csi_V1_ListVolumesResponse.self)
            }
            listed += page.entries.count
            token = page.nextToken
        } while !token.isEmpty
        let paginated = milliseconds(ContinuousClock.now - start)
        guard listed >= expected else {
            throw BenchError("ListVolumes (pages of \(pageSize)) returned \(listed) volumes, \(expected) exist")
        }
        let oneCallStart = ContinuousClock.now
        let all = try await controller.call("Controller", "ListVolumes", Csi_V1_ListVolumesRequest(),
                                            as: Csi_V1_ListVolumesResponse.self)
        let oneCall = milliseconds(ContinuousClock.now - oneCallStart)
        var capacity = Samples()
        var request = Csi_V1_GetCapacityRequest()
        request.volumeCapabilities = [Requests.capability()]
        request.parameters = ["replicas": String(replicas)]
        for _ in 0..<capacityCalls {
            _ = try await capacity.time {
                try await controller.call("Controller", "GetCapacity", request, as: Csi_V1_GetCapacityResponse.self)
            }
        }
        return [
            "list_paginated_ms": paginated, "list_pages": pages.ms.count, "list_page": pages.summary,
            "listed": listed, "list_unpaginated_ms": oneCall, "listed_unpaginated": all.entries.count,
            "get_capacity": capacity.summary,
        ]
    }

    /// Runs `--probe` with /bin/sh; its stdout as JSON when it parses, else as a string.
    func probeOutput() -> Any? {
        guard let probe else { return nil }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", probe]
        let pipe = Pipe()
        process.standardOutput = pipe
        do {
            try process.run()
        } catch {
            return "probe failed to start: \(error)"
        }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        if let json = try? JSONSerialization.jsonObject(with: data) { return json }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
