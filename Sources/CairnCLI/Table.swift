/// An aligned text table: each column as wide as its widest cell, two spaces between columns,
/// no trailing blanks. Numbers read better right-aligned.
public struct Table: Sendable {
    public enum Alignment: Sendable { case left, right }

    public struct Column: Sendable {
        public var title: String
        public var alignment: Alignment

        public init(_ title: String, _ alignment: Alignment = .left) {
            self.title = title
            self.alignment = alignment
        }
    }

    public var columns: [Column]
    public var rows: [[String]] = []

    public init(_ columns: [Column]) {
        self.columns = columns
    }

    public mutating func append(_ row: [String]) {
        precondition(row.count == columns.count, "a row of \(row.count) cells in a table of \(columns.count) columns")
        rows.append(row)
    }

    /// The header line, then one line per row, each ending in a newline.
    public func render() -> String {
        let all = [columns.map(\.title)] + rows
        let widths = columns.indices.map { i in all.map { $0[i].count }.max() ?? 0 }
        var text = ""
        for row in all {
            var line = ""
            for (i, cell) in row.enumerated() {
                let gap = String(repeating: " ", count: widths[i] - cell.count)
                if i > 0 { line += "  " }
                line += columns[i].alignment == .right ? gap + cell : cell + gap
            }
            while line.last == " " { line.removeLast() }
            text += line + "\n"
        }
        return text
    }
}

extension Table {
    /// "name:  value" lines, the values aligned after the longest name (inspect's header).
    public static func fields(_ fields: [(String, String)]) -> String {
        let width = fields.map(\.0.count).max() ?? 0
        return fields.map { "\($0.0):" + String(repeating: " ", count: width - $0.0.count + 1) + $0.1 + "\n" }.joined()
    }
}
