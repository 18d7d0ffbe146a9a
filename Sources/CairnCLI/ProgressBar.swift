/// A text progress bar: `[==========>         ]`, ASCII so that it reads the same in any
/// terminal, a log file or `tmux capture-pane`.
public enum ProgressBar {
    /// `width` counts the brackets; `fraction` is clamped to 0…1. A full bar has no head.
    public static func render(fraction: Double, width: Int = 32) -> String {
        let inner = max(1, width - 2)
        let f = fraction.isFinite ? min(1, max(0, fraction)) : 0
        let filled = Int((f * Double(inner)).rounded(.down))
        if filled >= inner { return "[" + String(repeating: "=", count: inner) + "]" }
        let head = filled > 0 || f > 0 ? ">" : " "
        return "[" + String(repeating: "=", count: filled) + head + String(repeating: " ", count: inner - filled - 1) + "]"
    }
}
