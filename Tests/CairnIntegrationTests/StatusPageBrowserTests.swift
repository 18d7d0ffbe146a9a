import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

/// Issue 17's browser test: the controller's status page in Debian's headless chromium, against
/// a real three-node bed. One page, opened once, follows a replica's node dying (degraded), coming
/// back and catching up (resyncing, with progress) and the volume healthy again — the page's own
/// polling redraws it, nothing reloads. A PNG of each state is saved in the run's output directory:
/// `$CAIRN_TEST_OUTPUT/status-page/` when that is set, else `.build/test-output/status-page/`
/// (the test prints the paths).
final class StatusPageBrowserTests: XCTestCase {
    var bed: Testbed?
    var browser: HeadlessChromium?

    /// Where the controller serves metrics and the page, inside the bed's ctl namespace.
    static let pageAddress = "10.77.0.1:9464"

    override func tearDown() async throws {
        let failed = (testRun?.failureCount ?? 0) + (testRun?.unexpectedExceptionCount ?? 0) > 0
        if let browser {
            if failed { print("==> chromium (\(browser.logPath))\n" + browser.logTail()) }
            browser.stop()
            XCTAssertEqual(HeadlessChromium.processes(inGroup: browser.pid, orNaming: browser.profile), [],
                           "chromium left processes behind")
        }
        browser = nil
        if let problem = bed?.down(after: testRun) { XCTFail(problem) }
        bed = nil
    }

    static var outputDirectory: String {
        let root = ProcessInfo.processInfo.environment["CAIRN_TEST_OUTPUT"]
            ?? URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent(".build/test-output").path
        return root + "/status-page"
    }

    func testPageShowsAVolumeDegradedThenResyncingThenHealthy() async throws {
        guard let chromium = HeadlessChromium.locate() else {
            throw XCTSkip("no chromium found (looked for chromium and chromium-headless-shell on PATH): install Debian's chromium (`apt-get install chromium`; `source scripts/setup` installs it with the test packages) to run the status page's browser test")
        }
        let output = Self.outputDirectory
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        print("status page test: screenshots and the browser's log go to \(output)")
        for file in ["degraded", "resyncing", "healthy"] { try? FileManager.default.removeItem(atPath: "\(output)/\(file).png") }

        // A rebuild limited to 20 MB/s: the 160 MiB n3 misses takes about 8 s to copy back.
        let bed = try Testbed.up(nodes: 3, nodeArgs: ["--rebuild-rate", "20", "--resync-retry", "0.5"],
                                 controllerArgs: ["--metrics-address", Self.pageAddress])
        self.bed = bed
        let created = try await bed.controller.createVolume(
            CSI.create(name: "status-page", access: .block, required: 256 << 20, parameters: ["replicas": "3"]))
        let volumeID = created.volume.volumeID
        let attached = try await bed.attachBlock(volumeID, on: "n1")

        let browser = try HeadlessChromium(binary: chromium, prefix: ["ip", "netns", "exec", Testbed.namespacePrefix + "ctl"],
                                           logPath: output + "/chromium.log")
        self.browser = browser
        try browser.open("http://\(Self.pageAddress)/")
        var page = try await waitForPage(browser, volumeID, "healthy", seconds: 30)
        XCTAssertEqual(page.nodes, ["n1": "live", "n2": "live", "n3": "live"])
        XCTAssertEqual(page.attached, "n1")
        let updatesAtStart = page.updates

        // n3 dies; a write finds it gone and the engine records its replica out of sync.
        try bed.kill("n3")
        try fill(attached.target, mebibytes: 160)
        page = try await waitForPage(browser, volumeID, "degraded", seconds: 60)
        XCTAssertEqual(page.replicas["n3"], false, "n3's badge: \(page.replicas)")
        // Once n3's registration lease runs out (10 s) the nodes table has it away, and the
        // controller's next pass (every 5 s) records that.
        page = try await waitForPage(browser, volumeID, "degraded", seconds: 60) {
            $0.nodes["n3"] == "away" && $0.events.contains("node-away")
        }
        XCTAssertEqual(page.replicas["n1"], true)
        XCTAssertTrue(page.events.contains("replica-out-of-sync"), "events: \(page.events)")
        try browser.screenshot(to: output + "/degraded.png")

        // n3 returns: the engine copies what it missed, and the page shows the progress.
        try bed.restart("n3")
        page = try await waitForPage(browser, volumeID, "resyncing", seconds: 60) { page in
            page.resync.contains { $0.node == "n3" && $0.active && $0.percent > 0 && $0.percent < 100 }
        }
        let resync = try XCTUnwrap(page.resync.first { $0.node == "n3" })
        XCTAssertTrue(resync.text.contains("%"), resync.text)
        try browser.screenshot(to: output + "/resyncing.png")
        print("status page: resyncing \(resync.percent)% — \(resync.text)")
        // The rate and ETA arrive with the second progress record.
        if let rated = try? await waitForPage(browser, volumeID, "resyncing", seconds: 10, until: { page in
            page.resync.contains { $0.node == "n3" && $0.text.contains("/s") && $0.text.contains("ETA ") && !$0.text.contains("unknown") }
        }) {
            page = rated
            try browser.screenshot(to: output + "/resyncing.png")
            print("status page: resyncing with a rate — \(page.resync.first { $0.node == "n3" }?.text ?? "")")
        } else {
            XCTFail("the resync never showed a rate and an ETA")
        }

        page = try await waitForPage(browser, volumeID, "healthy", seconds: 120)
        XCTAssertEqual(page.replicas, ["n1": true, "n2": true, "n3": true])
        XCTAssertTrue(page.resync.isEmpty)
        XCTAssertTrue(page.events.contains("replica-in-sync"), "events: \(page.events)")
        XCTAssertTrue(page.events.contains("attached"), "events: \(page.events)")
        XCTAssertGreaterThan(page.updates, updatesAtStart + 3, "the page redrew itself without a reload")
        try browser.screenshot(to: output + "/healthy.png")
        for file in ["degraded", "resyncing", "healthy"] {
            let path = "\(output)/\(file).png"
            let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
            XCTAssertGreaterThan(size, 1000, "\(path) is not a screenshot")
            print("status page screenshot (\(file)): \(path)")
        }
        try await bed.detach(volumeID, attached)
    }

    // MARK: Reading the page

    struct Page: Decodable {
        struct Resync: Decodable {
            var node: String
            var percent: Double
            var active: Bool
            var text: String
        }
        var updates: Int
        var condition: String?
        var attached: String?
        var replicas: [String: Bool]
        var resync: [Resync]
        var nodes: [String: String]
        var events: [String]
    }

    /// What the page shows now, read from its DOM (the hooks StatusPage documents).
    func read(_ browser: HeadlessChromium, _ volumeID: String) throws -> Page {
        let script = """
            (() => {
              const row = document.querySelector('tr[data-volume-id="\(volumeID)"]');
              const all = (root, selector) => root ? [...root.querySelectorAll(selector)] : [];
              return JSON.stringify({
                updates: Number(document.body.dataset.updates),
                condition: row ? row.dataset.condition : null,
                attached: row ? row.querySelector('[data-attached]').dataset.attached : null,
                replicas: Object.fromEntries(all(row, '.replica[data-replica-node]').map(b => [b.dataset.replicaNode, b.dataset.inSync === 'true'])),
                resync: all(row, '.resync').map(r => ({ node: r.dataset.replicaNode, percent: Number(r.dataset.percent),
                                                        active: r.dataset.active === 'true', text: r.textContent })),
                nodes: Object.fromEntries(all(document, 'tr[data-node-id]').map(n => [n.dataset.nodeId, n.dataset.state])),
                events: all(document, '#events li[data-event-kind]').map(e => e.dataset.eventKind),
              });
            })()
            """
        guard let json = try browser.evaluate(script) as? String else { throw FixtureError("the page's state is not a string") }
        return try JSONDecoder().decode(Page.self, from: Data(json.utf8))
    }

    /// Polls the page until the volume's row shows `condition` (and `until` holds).
    func waitForPage(_ browser: HeadlessChromium, _ volumeID: String, _ condition: String, seconds: Double,
                     until: (Page) -> Bool = { _ in true }) async throws -> Page {
        let deadline = Date().addingTimeInterval(seconds)
        var last: Page?
        var problem: (any Error)?
        while Date() < deadline {
            do {
                let page = try read(browser, volumeID)
                last = page
                if page.condition == condition && until(page) { return page }
            } catch {
                problem = error  // the page is still loading
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        let connection = (try? browser.evaluate("document.getElementById('connection')?.textContent ?? document.location.href")) as? String
        throw FixtureError("the page did not show volume \(volumeID) \(condition) within \(Int(seconds)) s; it showed \(last.map { "\($0.condition ?? "no row"), replicas \($0.replicas), resync \($0.resync.map { "\($0.node) \($0.percent)% active=\($0.active)" }), nodes \($0.nodes)" } ?? "nothing") (connection: \(connection ?? "?"); last error reading it: \(problem.map { "\($0)" } ?? "none"))")
    }

    /// Writes `mebibytes` of random data from offset 0, O_DIRECT, then fsyncs.
    func fill(_ device: String, mebibytes: Int) throws {
        let result = try Command.runBlocking(["dd", "if=/dev/urandom", "of=\(device)", "bs=1M", "count=\(mebibytes)",
                                              "oflag=direct", "conv=fsync,notrunc"], timeout: .seconds(120))
        guard result.status == 0 else { throw FixtureError("dd to \(device) failed: \(result.output)") }
    }
}
