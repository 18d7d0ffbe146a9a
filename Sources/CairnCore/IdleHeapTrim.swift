import Foundation

#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("malloc_trim")
private func c_malloc_trim(_ pad: Int) -> Int32

/// When a process gives its freed heap back to the kernel (docs/engine.md, "Idle volumes give
/// their buffers back"). glibc keeps memory that threads freed in their arenas for reuse: after
/// a burst of I/O a replica server or engine holds tens of MiB it no longer uses, for as long
/// as it runs, and an operator reads it as a leak. `malloc_trim(0)` returns the free pages of
/// every arena, but walks each under its lock: done only after the process has been idle
/// (almost no CPU time) for the idle time, and once per idle spell that followed work.
public struct IdleHeapTrimPolicy: Sendable {
    /// How long the process must be idle (nanoseconds).
    public let idle: UInt64
    /// At most this share of one CPU over the idle time counts as idle (heartbeats, metrics).
    public let idleCPUShare: Double
    private var samples: [(time: UInt64, cpu: UInt64)] = []
    /// Work since the last trim (the process starts with its start-up's garbage).
    private var busySinceTrim = true

    public init(idleNanoseconds: UInt64, idleCPUShare: Double = 0.02) {
        idle = idleNanoseconds
        self.idleCPUShare = idleCPUShare
    }

    /// Records the process's CPU time `cpu` at monotonic `time` (both ns); true when the heap
    /// should be trimmed now.
    public mutating func sample(time: UInt64, cpu: UInt64) -> Bool {
        samples.append((time, cpu))
        // Keep one sample at or before the window's start, and those after it.
        let windowStart = time > idle ? time - idle : 0
        while samples.count > 1, samples[1].time <= windowStart { samples.removeFirst() }
        guard let first = samples.first, time > first.time else { return false }
        let span = time - first.time
        let share = Double(cpu &- first.cpu) / Double(span)
        if share > idleCPUShare {
            busySinceTrim = true
            return false
        }
        guard span >= idle, busySinceTrim else { return false }
        busySinceTrim = false
        return true
    }
}

/// Runs the policy against this process: its CPU time every `interval`, `malloc_trim(0)` when
/// the policy says so. `CAIRN_IDLE_TRIM_SECONDS` (default 30; 0 turns it off) is the idle time.
public enum IdleHeapTrim {
    public static var idleSeconds: Double {
        guard let raw = getenv("CAIRN_IDLE_TRIM_SECONDS").map({ String(cString: $0) }) else { return 30 }
        guard let seconds = Double(raw.trimmingCharacters(in: .whitespaces)), seconds >= 0, seconds < 86_400 * 7 else { return 30 }
        return seconds
    }

    /// The process's CPU time (user and system, every thread), nanoseconds.
    public static func processCPUNanoseconds() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }

    /// Resident bytes of this process (/proc/self/statm), 0 if unreadable.
    public static func residentBytes() -> UInt64 {
        guard let text = ProcFile.textIfReadable("/proc/self/statm") else { return 0 }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = UInt64(fields[1]) else { return 0 }
        return pages * UInt64(sysconf(Int32(_SC_PAGESIZE)))
    }

    /// Gives the free pages of every malloc arena back; the resident bytes before and after.
    public static func trim() -> (before: UInt64, after: UInt64) {
        let before = residentBytes()
        _ = c_malloc_trim(0)
        return (before, residentBytes())
    }
}
