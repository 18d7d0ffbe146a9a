import ArgumentParser
import CairnCore
import CairnSecurity
import Foundation
import Logging

/// `cairn ca …`: the cluster's certificate authority.
struct CACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca",
        abstract: "The cluster's certificate authority (signs every node's and controller's certificate).",
        subcommands: [CAInit.self]
    )
}

struct CAInit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create the cluster's CA: DIR/ca.key (keep it off the nodes) and DIR/ca.crt.",
        discussion: """
            Then issue each node's and controller's certificate with `cairn cert issue`. \
            Example: cairn ca init --dir /root/cairn-ca
            """)

    @Option(help: "Where to write ca.key (mode 0600) and ca.crt.")
    var dir: String

    @Option(name: .customLong("trust-domain"), help: "The cluster's name in its SPIFFE IDs (spiffe://TRUST-DOMAIN/node/ID); a node accepts only peers of its own.")
    var trustDomain = "cairn"

    @Option(help: "Days the CA certificate is valid.")
    var days = 3650

    func run() throws {
        do {
            try CertificateAuthority.create(directory: dir, trustDomain: trustDomain, days: days)
        } catch {
            throw ValidationError(Self.message(error))
        }
        print("CA of trust domain \(trustDomain) written to \(dir)/ca.crt (key: \(dir)/ca.key, keep it secret)")
    }
}

/// `cairn cert …`: certificates from the cluster's CA.
struct CertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cert",
        abstract: "Issue and inspect node and controller certificates.",
        subcommands: [CertIssue.self, CertShow.self]
    )
}

struct CertIssue: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "issue",
        abstract: "Issue NAME's certificate: OUT/tls.crt, OUT/tls.key (0600) and OUT/ca.crt, as a cert-manager Secret holds them.",
        discussion: """
            A node's certificate names spiffe://TRUST-DOMAIN/node/NAME (NAME is its --node-id); a \
            controller's spiffe://TRUST-DOMAIN/controller/NAME; `--role node,controller` both (a --role all \
            process). A server certificate (e.g. etcd's) names only its --ip and --dns. Point `cairn serve \
            --tls-dir` at OUT. Issuing again into OUT rotates it: running processes pick the new files up \
            for new connections, and the old certificate stays valid until it expires.
            Example: cairn cert issue n1 --ca-dir /root/cairn-ca --out /var/lib/cairn/tls
            """)

    @Argument(help: "The node id, controller name, or server name.")
    var name: String

    @Option(name: .customLong("ca-dir"), help: "The directory of `cairn ca init`.")
    var caDir: String

    @Option(help: "Where to write tls.crt, tls.key and ca.crt.")
    var out: String

    @Option(help: "node, controller, node,controller, or server.")
    var role = "node"

    @Option(help: "An IP address the certificate names (repeatable).")
    var ip: [String] = []

    @Option(help: "A DNS name the certificate names (repeatable).")
    var dns: [String] = []

    @Option(help: "Days the certificate is valid.")
    var days = 365

    func run() throws {
        let roles = role.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        var kinds: [SpiffeID.Kind] = []
        for r in roles where r != "server" {
            guard let kind = SpiffeID.Kind(rawValue: r) else {
                throw ValidationError("--role \(role): each role must be node, controller or server")
            }
            kinds.append(kind)
        }
        guard !(roles.contains("server") && !kinds.isEmpty) else {
            throw ValidationError("--role server cannot be combined with node or controller")
        }
        do {
            let td = try CertificateAuthority.trustDomain(caDirectory: caDir)
            try CertificateAuthority.issue(caDirectory: caDir, trustDomain: td, name: name, kinds: kinds, ips: ip, dns: dns,
                                           days: days, out: out)
            let info = try CertificateInfo.read(out + "/tls.crt")
            print("issued \(info.subject) [\((info.uris + ip.map { "IP:\($0)" } + dns.map { "DNS:\($0)" }).joined(separator: ", "))] valid until \(info.notAfter) into \(out)")
        } catch {
            throw ValidationError(Self.message(error))
        }
    }
}

struct CertShow: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "show",
        abstract: "Print who a TLS directory's certificate names and until when it is valid, and check the key and CAs load.")

    @Argument(help: "A TLS directory (ca.crt, tls.crt, tls.key).")
    var dir: String

    func run() throws {
        let files = TLSFiles(directory: dir)
        do {
            let context = try TLSContext(files)
            let info = context.info
            print("subject:    \(info.subject)")
            print("identities: \(info.uris.joined(separator: ", "))")
            print("valid:      \(info.notBefore) to \(info.notAfter)")
            let days = Int(info.notAfter.timeIntervalSinceNow / 86400)
            print(days < 0 ? "EXPIRED" : "expires in \(days) day(s); key matches; CAs load")
        } catch {
            throw ValidationError(Self.message(error))
        }
    }
}

extension ParsableCommand {
    /// An error as a user reads it: a CairnError's message without its status code.
    static func message(_ error: any Error) -> String {
        (error as? CairnError)?.message ?? "\(error)"
    }
}

/// The options every command that speaks the data protocol shares.
struct DataSecurityOptions: ParsableArguments {
    @Option(name: .customLong("data-security"), help: "How replica traffic is protected: auth (mutual TLS 1.3 handshake, every record integrity-checked; the default), secure (also encrypted), or none (plain TCP: anyone on the network reads and writes replicas; needs --allow-unauthenticated-data). Default: $CAIRN_DATA_SECURITY, else auth.")
    var dataSecurity: String?

    @Option(name: .customLong("tls-dir"), help: "This process's identity: ca.crt, tls.crt, tls.key (from `cairn cert issue`, or a cert-manager Secret). Default: $CAIRN_TLS_DIR, else <data-dir>/tls.")
    var tlsDir: String?

    @Flag(name: .customLong("allow-unauthenticated-data"), help: "Allow --data-security none.")
    var allowUnauthenticatedData = false

    /// The mode and identity, or an error that says what to do.
    func resolve(dataDir: String?, logger: Logger) throws -> DataPlaneSecurity {
        let env = ProcessInfo.processInfo.environment
        let dataSecurity = self.dataSecurity ?? env["CAIRN_DATA_SECURITY"] ?? "auth"
        let tlsDir = self.tlsDir ?? env["CAIRN_TLS_DIR"]
        guard let mode = DataSecurity(rawValue: dataSecurity) else {
            throw ValidationError("--data-security \(dataSecurity): use auth, secure or none")
        }
        if mode == .none {
            guard allowUnauthenticatedData || env["CAIRN_ALLOW_UNAUTHENTICATED_DATA"] == "1" else {
                throw ValidationError("--data-security none sends replica traffic unauthenticated (anyone who reaches the data port reads, overwrites and fences every replica); add --allow-unauthenticated-data to mean it, or give --tls-dir")
            }
            logger.warning("replica traffic is NOT authenticated (--data-security none): any process that reaches the data address can read, overwrite or fence this node's replicas; use --data-security auth with --tls-dir")
            return .insecure
        }
        let dir = tlsDir ?? dataDir.map { $0 + "/tls" }
        guard let dir else {
            throw ValidationError("--data-security \(mode) needs this process's certificate: give --tls-dir DIR (made with `cairn ca init` and `cairn cert issue`)")
        }
        let identity: TLSIdentity
        do {
            identity = try TLSIdentity(files: TLSFiles(directory: dir), logger: logger)
        } catch {
            throw ValidationError("--data-security \(mode): \(error)\(tlsDir == nil ? " (no --tls-dir given; looked in \(dir))" : ""); or run with --data-security none --allow-unauthenticated-data")
        }
        return DataPlaneSecurity(mode: mode, identity: identity)
    }
}
