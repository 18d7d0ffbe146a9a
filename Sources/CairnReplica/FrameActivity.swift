/// `activity` (op 20): the engine settles what it knows reached every in-sync replica and asks
/// what is left (`ActivityLog`; docs/recovery.md, "Convergence after failover").
///   req: volume | clean-through generation u64 | flags u8 (bit 0: converged — clear the
///        restart's unknown)
///   rsp: status u8 | all u8 (1: compare the whole replica) | count u32 | count × region u64 | message
public struct ActivityRequest: WireCodable {
    public static let convergedFlag: UInt8 = 1

    public var volume: String
    public var cleanThrough: UInt64
    public var converged: Bool

    public init(volume: String, cleanThrough: UInt64, converged: Bool) {
        self.volume = volume
        self.cleanThrough = cleanThrough
        self.converged = converged
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.write(cleanThrough)
        w.write(converged ? Self.convergedFlag : 0)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        cleanThrough = try r.readUInt64("clean-through generation")
        let flags = try r.readUInt8("activity flags")
        guard flags & ~Self.convergedFlag == 0 else {
            throw FrameError(.malformedPayload, "activity flags \(flags) has unknown bits")
        }
        converged = flags & Self.convergedFlag != 0
        try r.expectEnd()
    }
}

public struct ActivityResponse: WireResponse {
    public var status: ReplyStatus
    public var message: String
    public var activity: ReplicaActivity

    public init(status: ReplyStatus, activity: ReplicaActivity = .unknown, message: String = "") {
        self.status = status
        self.activity = activity
        self.message = message
    }

    public init(failure: ReplyFailure) { self.init(status: failure.status, message: failure.message) }

    public func encode() -> [UInt8] {
        // A list past the limit is sent as "everything" (it cannot be, the log caps it first).
        let all = activity.all || activity.regions.count > ActivityLog.maxTracked
        let regions = all ? [] : activity.regions
        var w = ByteWriter(capacity: 8 + 8 * regions.count)
        w.write(status.rawValue)
        w.write(UInt8(all ? 1 : 0))
        w.write(UInt32(regions.count))
        for region in regions { w.write(region) }
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        let all = try r.readUInt8("all")
        guard all <= 1 else { throw FrameError(.malformedPayload, "activity 'all' is \(all), not 0 or 1") }
        let count = try r.readUInt32("region count")
        guard count <= ActivityLog.maxTracked else {
            throw FrameError(.malformedPayload, "activity region count \(count) exceeds the limit of \(ActivityLog.maxTracked)")
        }
        // "All" means no list: a peer that sends both says two things (found by fuzzing).
        guard all == 0 || count == 0 else {
            throw FrameError(.malformedPayload, "activity response says 'all' and also lists \(count) regions")
        }
        guard r.remaining >= Int(count) * 8 else {
            throw FrameError(.malformedPayload, "payload ends inside the regions (needs \(Int(count) * 8) bytes, \(r.remaining) left)")
        }
        var regions: [UInt64] = []
        regions.reserveCapacity(Int(count))
        for _ in 0..<count { regions.append(try r.readUInt64("region")) }
        activity = ReplicaActivity(all: all == 1, regions: regions)
        message = try r.readMessage()
        try r.expectEnd()
    }
}
