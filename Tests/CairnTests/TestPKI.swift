import CairnCore
import CairnRPC
import Foundation

/// A throw-away CA and the certificates the TLS tests need, made with the openssl CLI in a
/// directory the test removes. Certificates are shaped like `cairn cert issue`'s: ECDSA P-256,
/// serverAuth+clientAuth, a SPIFFE URI SAN for nodes and controllers.
struct TestPKI {
    let dir: String
    let trustDomain: String

    /// Writes DIR/ca.crt and DIR/ca.key.
    static func make(in dir: String, trustDomain: String = "cairn") throws -> TestPKI {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", dir + "/ca.key", "-out", dir + "/ca.crt", "-days", "2", "-subj", "/CN=\(trustDomain) test CA",
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        return TestPKI(dir: dir, trustDomain: trustDomain)
    }

    var caFile: String { dir + "/ca.crt" }

    /// A node's identity: URI SAN spiffe://TD/node/NAME and DNS SAN NAME.
    func node(_ name: String, ips: [String] = []) throws -> TLSCredentials {
        try issue(name, uris: ["spiffe://\(trustDomain)/node/\(name)"], dns: [name], ips: ips)
    }

    func controller(_ name: String) throws -> TLSCredentials {
        try issue(name, uris: ["spiffe://\(trustDomain)/controller/\(name)"], dns: [name])
    }

    /// Writes DIR/NAME/{tls.crt,tls.key,ca.crt} (replacing an earlier NAME) and returns them.
    func issue(_ name: String, uris: [String] = [], dns: [String] = [], ips: [String] = []) throws -> TLSCredentials {
        let out = dir + "/" + name
        try? FileManager.default.removeItem(atPath: out)
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let sans = uris.map { "URI:\($0)" } + dns.map { "DNS:\($0)" } + ips.map { "IP:\($0)" }
        var ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        if !sans.isEmpty { ext += "subjectAltName=" + sans.joined(separator: ",") + "\n" }
        try ext.write(toFile: out + "/ext.cnf", atomically: true, encoding: .utf8)
        try Self.openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                          "-keyout", out + "/tls.key", "-out", out + "/tls.csr", "-subj", "/CN=\(name)"])
        try Self.openssl(["x509", "-req", "-in", out + "/tls.csr", "-CA", caFile, "-CAkey", dir + "/ca.key",
                          "-CAcreateserial", "-out", out + "/tls.crt", "-days", "2", "-extfile", out + "/ext.cnf"])
        try FileManager.default.copyItem(atPath: caFile, toPath: out + "/ca.crt")
        return TLSCredentials(caFile: out + "/ca.crt", certFile: out + "/tls.crt", keyFile: out + "/tls.key")
    }

    private static func openssl(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw CairnError.internal("openssl \(arguments.joined(separator: " ")) failed: \(text)")
        }
    }
}
