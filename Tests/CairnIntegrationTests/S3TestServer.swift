import CairnBackup
import CairnCore
import Foundation
import XCTest

/// A real S3-compatible server for the backup tests: moto's server (PyPI `moto[server]`, which
/// scripts/setup installs into .build/moto-venv) on a free loopback port, with SigV4 verification
/// on. moto checks signatures only after its first INITIAL_NO_AUTH_ACTION_COUNT requests, so
/// those make an IAM user with an allow-all policy and its access key (boto3, from the same
/// venv); every request after that must be signed with that key pair. `stop()` kills it and
/// removes its directory (it keeps objects in memory); a test that dies leaves no server behind
/// only if it gets that far, so each test calls `stop()` in a `defer`.
final class S3TestServer: @unchecked Sendable {
    static var venv: String {
        if let v = ProcessInfo.processInfo.environment["CAIRN_MOTO_VENV"] { return v }
        // Tests/CairnIntegrationTests/S3TestServer.swift → the package root.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.path + "/.build/moto-venv"
    }

    let dir: String
    let endpoint: String
    let accessKeyID: String
    let secretAccessKey: String
    private let process: Process
    let namespace: String?

    private init(dir: String, endpoint: String, accessKeyID: String, secretAccessKey: String, process: Process, namespace: String?) {
        self.namespace = namespace
        self.dir = dir
        self.endpoint = endpoint
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.process = process
    }

    /// The server on loopback; or, with `namespace`, inside that network namespace (a test
    /// bed's, where only its processes reach it) on `host:port`, with `bucket` made there.
    static func start(namespace: String? = nil, host: String = "127.0.0.1", port: Int? = nil, bucket: String? = nil) async throws -> S3TestServer {
        let server = venv + "/bin/moto_server"
        guard FileManager.default.isExecutableFile(atPath: server) else {
            throw CairnError.failedPrecondition("\(server) is missing: run `source scripts/setup` (it installs moto[server] from PyPI there)")
        }
        let dir = NSTemporaryDirectory() + "cairn-s3-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let port = try port ?? freePort()
        let endpoint = "http://\(host):\(port)"
        let process = Process()
        // nsenter without --fork execs the server: the process is the server itself.
        process.executableURL = URL(fileURLWithPath: namespace == nil ? server : "/usr/bin/nsenter")
        process.arguments = (namespace.map { ["--net=/run/netns/\($0)", "--", server] } ?? []) + ["-H", host, "-p", "\(port)"]
        var environment = ProcessInfo.processInfo.environment
        environment["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        process.environment = environment
        FileManager.default.createFile(atPath: dir + "/moto.log", contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/moto.log"))
        process.standardOutput = log
        process.standardError = log
        do {
            try process.run()
            let keys = try await makeUser(endpoint: endpoint, dir: dir, process: process, namespace: namespace, bucket: bucket)
            return S3TestServer(dir: dir, endpoint: endpoint, accessKeyID: keys.0, secretAccessKey: keys.1, process: process, namespace: namespace)
        } catch {
            if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
            try? FileManager.default.removeItem(atPath: dir)
            throw error
        }
    }

    /// Waits for the server, then spends the three unauthenticated requests on the user (and
    /// makes `bucket` with its key).
    private static func makeUser(endpoint: String, dir: String, process: Process, namespace: String?, bucket: String?) async throws -> (String, String) {
        let script = """
            import boto3, json, sys, time
            kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
            iam = boto3.client("iam", **kw)
            for _ in range(200):
                try:
                    iam.create_user(UserName="cairn")
                    break
                except Exception as e:
                    if "Connect" not in type(e).__name__ and "Connection" not in str(e): raise
                    time.sleep(0.1)
            iam.put_user_policy(UserName="cairn", PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            key = iam.create_access_key(UserName="cairn")["AccessKey"]
            if len(sys.argv) > 2:
                boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                             aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket=sys.argv[2])
            print(key["AccessKeyId"], key["SecretAccessKey"])
            """
        try script.write(toFile: dir + "/user.py", atomically: true, encoding: .utf8)
        let (status, text) = try python([dir + "/user.py", endpoint] + (bucket.map { [$0] } ?? []), namespace: namespace)
        let words = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard status == 0, words.count >= 2, process.isRunning else {
            let log = (try? String(contentsOfFile: dir + "/moto.log", encoding: .utf8)) ?? ""
            throw CairnError.unavailable("moto_server did not start or refused the IAM set-up: \(text.suffix(2000))\n\(log.suffix(2000))")
        }
        return (String(words[words.count - 2]), String(words[words.count - 1]))
    }

    /// Runs the venv's python (in `namespace`, if any); its status and output.
    static func python(_ arguments: [String], namespace: String?) throws -> (Int32, String) {
        let python = Process()
        python.executableURL = URL(fileURLWithPath: namespace == nil ? venv + "/bin/python3" : "/usr/bin/nsenter")
        python.arguments = (namespace.map { ["--net=/run/netns/\($0)", "--", venv + "/bin/python3"] } ?? []) + arguments
        let out = Pipe()
        python.standardOutput = out
        python.standardError = out
        try python.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        python.waitUntilExit()
        return (python.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Downloads every object of `bucket` into `directory` (keys as paths) with boto3, where the
    /// server is reachable (its namespace); returns the total of their sizes.
    func download(bucket: String, into directory: String) throws -> Int64 {
        let script = """
            import boto3, os, sys
            s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2],
                              aws_secret_access_key=sys.argv[3])
            total = 0
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[4]):
                for o in page.get("Contents", []):
                    path = os.path.join(sys.argv[5], o["Key"])
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    s3.download_file(sys.argv[4], o["Key"], path)
                    total += o["Size"]
            print(total)
            """
        try script.write(toFile: dir + "/download.py", atomically: true, encoding: .utf8)
        let (status, text) = try Self.python([dir + "/download.py", endpoint, accessKeyID, secretAccessKey, bucket, directory], namespace: namespace)
        guard status == 0, let total = Int64(text.split(separator: "\n").last ?? "") else {
            throw CairnError.unavailable("downloading bucket \(bucket) failed: \(text.suffix(2000))")
        }
        return total
    }

    /// A new directory with `credentials` (this server's key) and `targets.json` naming one
    /// target `offsite` on this server; the caller removes the directory.
    func writeTargets(bucket: String, prefix: String, parallelism: Int = 4) throws -> String {
        let config = NSTemporaryDirectory() + "cairn-backup-cfg-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: config, withIntermediateDirectories: true)
        try "# test key\naws_access_key_id = \(accessKeyID)\naws_secret_access_key = \(secretAccessKey)\n"
            .write(toFile: config + "/credentials", atomically: true, encoding: .utf8)
        let targets = """
            {"targets": {"offsite": {"endpoint": "\(endpoint)", "bucket": "\(bucket)", "region": "us-east-1",
                                     "prefix": "\(prefix)", "credentialsFile": "\(config)/credentials", "parallelism": \(parallelism)}}}
            """
        try targets.write(toFile: config + "/targets.json", atomically: true, encoding: .utf8)
        return config
    }

    /// A client for a fresh bucket (made), keys under `prefix`.
    func client(bucket: String = "b-\(UUID().uuidString.prefix(8).lowercased())", prefix: String = "cairn") async throws -> S3Client {
        let client = S3Client(location(bucket: bucket, prefix: prefix))
        try await client.createBucket()
        return client
    }

    func location(bucket: String, prefix: String = "cairn", secret: String? = nil) -> S3Location {
        S3Location(endpoint: endpoint, bucket: bucket, region: "us-east-1", prefix: prefix,
                   accessKeyID: accessKeyID, secretAccessKey: secret ?? secretAccessKey)
    }

    /// The server's own count: the sizes of every object under `prefix` (ListObjectsV2).
    func storedBytes(_ client: S3Client) async throws -> Int64 {
        try await client.list("").reduce(0) { $0 + $1.size }
    }

    /// A loopback TCP port nobody listens on now (bound to port 0, read back, released).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CairnError.unavailable("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw CairnError.unavailable("bind 127.0.0.1:0: \(String(cString: strerror(errno)))") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// SIGKILL: moto's server ignores SIGTERM.
    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: dir)
    }
}
