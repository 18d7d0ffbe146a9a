import ArgumentParser
import CairnReplica
import CairnReplicaControl
import CairnRPC
import CairnSecurity
import Logging

/// The ReplicaControl service of a process that runs the replica server, on its TCP control
/// address (`--control-address`; by default the data address's host and port + 1), started with
/// the process's other gRPC servers and recorded in the node record.
struct ReplicaControlServing {
    /// "host:port" as recorded in the node record.
    let address: String
    let served: ServedEndpoint

    /// Nil when this process serves no replicas, or `--control-address none`.
    /// With `identity` (the process's, `--tls-dir`), served over mutual TLS and authorized by
    /// `ReplicaControlAccess` (the cluster's controllers and this node itself).
    init?(flag: String?, replicaServer: ReplicaServer?, identity: TLSIdentity?, nodeID: String, logger: Logger) throws {
        guard let replicaServer else {
            if let flag, flag != "none" {
                throw ValidationError("--control-address \(flag) is served beside the replica server: it needs --data-address (and the process that serves it)")
            }
            return nil
        }
        if flag == "none" {
            logger.warning("--control-address none: replica control goes over the data protocol's deprecated ops")
            return nil
        }
        let parsed: ReplicaAddress
        if let flag {
            do { parsed = try ReplicaAddress(flag) } catch {
                throw ValidationError("--control-address \(flag) is not HOST:PORT (\(error))")
            }
        } else {
            let dataPort = replicaServer.boundPort
            guard dataPort < UInt16.max else {
                throw ValidationError("the replica server listens on port \(dataPort): pass --control-address HOST:PORT")
            }
            parsed = ReplicaAddress(host: replicaServer.host, port: dataPort + 1)
        }
        address = "\(parsed)"
        let router = Router()
        ReplicaControlService(server: replicaServer).register(
            on: router, access: identity.map { ReplicaControlAccess(trustDomain: $0.trustDomain, nodeID: nodeID) })
        var controlLogger = logger
        controlLogger[metadataKey: "replica.control"] = "\(address)"
        served = ServedEndpoint(name: "replica-control", endpoint: "tcp://\(address)", socketMode: 0o600,
                                server: GRPCServer(router: router, logger: controlLogger, tls: identity.map { TLSCredentials($0.files) }),
                                optional: false)
        logger.info("serving replica control", metadata: [
            "control.address": "\(address)",
            "control.tls": "\(identity.map { "mutual, as \($0.identity)" } ?? "none (plaintext, no caller checked)")"])
    }
}
