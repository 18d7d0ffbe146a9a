import CCairnBuildInfo

/// Plugin identity, served by every role.
public enum CairnVersion {
    public static let pluginName = "csi.cairn.dev"
    public static let release = "0.1.0"
    /// The commit this binary was built from (from the package manifest at build time).
    public static let commit = String(cString: cairn_build_commit())
    /// GetPluginInfo's vendor_version: "0.1.0+abc1234" (or "+abc1234-dirty").
    public static let version = commit == "unknown" ? release : "\(release)+\(commit)"
}
