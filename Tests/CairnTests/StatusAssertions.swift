import CairnCore
import XCTest

extension XCTestCase {
    /// Asserts that `body` fails with exactly `code` (a CairnError carrying that status).
    func assertStatus<T>(_ code: StatusCode, _ body: () async throws -> T,
                         file: StaticString = #filePath, line: UInt = #line) async {
        await CairnTests.assertStatus(code, body, file: file, line: line)
    }
}

/// The same, outside a test case (shared test bodies such as StoreContract).
func assertStatus<T>(_ code: StatusCode, _ body: () async throws -> T,
                     file: StaticString = #filePath, line: UInt = #line) async {
    do {
        _ = try await body()
        XCTFail("expected \(code), got OK", file: file, line: line)
    } catch let e as CairnError {
        XCTAssertEqual(e.code, code, e.message, file: file, line: line)
    } catch {
        XCTFail("expected \(code), got \(error)", file: file, line: line)
    }
}
