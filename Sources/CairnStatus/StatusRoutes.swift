import CairnCore
import Foundation
import Hummingbird
import Logging
import NIOCore

/// The status page and its JSON API, added to the controller's `--metrics-address` listener
/// (docs/status-page.md):
///
///     GET /                         the page (self-contained HTML; polls /api/v1/status)
///     GET /api/v1/status            ClusterStatus: nodes, volumes, events
///     GET /api/v1/nodes             [NodeStatus]
///     GET /api/v1/volumes           [VolumeStatus]
///     GET /api/v1/volumes/{id}      VolumeStatus (404 when there is no such volume)
///     GET /api/v1/events            [ClusterEvent], newest first
///
/// A store that cannot be read answers 503 with `{"error": "…"}` saying what to check.
public enum StatusRoutes {
    /// What the `--metrics-address` listener takes to add routes (CairnObservability's `RouteInstaller`).
    public typealias Installer = @Sendable (Router<BasicRequestContext>) -> Void

    /// The page and the API as an installer for the listener.
    public static func installer(_ reader: ClusterStatusReader, logger: Logger) -> Installer {
        { router in install(reader, on: router, logger: logger) }
    }

    public static func install(_ reader: ClusterStatusReader, on router: Router<BasicRequestContext>, logger: Logger) {
        router.get("/") { _, _ -> Response in
            Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"],
                     body: .init(byteBuffer: ByteBuffer(string: StatusPage.html)))
        }
        router.get("/api/v1/status") { _, _ -> Response in
            await answer(logger) { try await reader.status() }
        }
        router.get("/api/v1/nodes") { _, _ -> Response in
            await answer(logger) { try await reader.status().nodes }
        }
        router.get("/api/v1/volumes") { _, _ -> Response in
            await answer(logger) { try await reader.status().volumes }
        }
        router.get("/api/v1/volumes/:id") { _, context -> Response in
            let id = try context.parameters.require("id")
            return await answer(logger) {
                guard let volume = try await reader.status().volumes.first(where: { $0.id == id }) else {
                    throw CairnError.notFound("volume \(id) does not exist")
                }
                return volume
            }
        }
        router.get("/api/v1/events") { _, _ -> Response in
            await answer(logger) { try await reader.status().events }
        }
    }

    /// The document as JSON, or the error as `{"error": …}` with 404 (NOT_FOUND) or 503.
    static func answer(_ logger: Logger, _ body: () async throws -> some Encodable) async -> Response {
        do {
            return try json(.ok, ClusterStatus.encoder().encode(try await body()))
        } catch let error as CairnError where error.code == .notFound {
            return json(.notFound, error.message)
        } catch {
            logger.warning("the status page cannot read the cluster store", metadata: ["error": "\(error)"])
            return json(.serviceUnavailable,
                        "cannot read the cluster store: \(error); check that the store (etcd, or the SQLite database) is reachable, and see the controller's log")
        }
    }

    static func json(_ status: HTTPResponse.Status, _ error: String) -> Response {
        json(status, (try? ClusterStatus.encoder().encode(["error": error])) ?? Data())
    }

    static func json(_ status: HTTPResponse.Status, _ body: Data) -> Response {
        Response(status: status, headers: [.contentType: "application/json", .cacheControl: "no-store"],
                 body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }
}
