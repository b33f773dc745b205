//! Oplog timestamps (`ts`: seconds and an increment within the second) and how they appear in
//! object names and on the command line. Wall-clock times are formatted and parsed by
//! [`pitr_archive::time`], as everywhere in pitr.

use std::fmt;

/// An oplog `ts`. Ordered as MongoDB orders them: by seconds, then by increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Ts {
    /// Seconds since the Unix epoch, the primary's clock when it wrote the entry.
    pub secs: u32,
    /// The entry's number within that second.
    pub inc: u32,
}

impl Ts {
    /// Before every entry: where an empty archive starts.
    pub const ZERO: Ts = Ts { secs: 0, inc: 0 };

    /// From the driver's type.
    pub fn from_bson(t: bson::Timestamp) -> Ts {
        Ts { secs: t.time, inc: t.increment }
    }

    /// To the driver's type.
    pub fn to_bson(self) -> bson::Timestamp {
        bson::Timestamp { time: self.secs, increment: self.inc }
    }

    /// As object names carry it ([`pitr_archive::names::mongo::ts`]): fixed-width, so that names
    /// sort in `ts` order.
    pub fn to_name(self) -> String {
        pitr_archive::names::mongo::ts((self.secs, self.inc))
    }

    /// Parses [`Ts::to_name`]'s form.
    pub fn from_name(s: &str) -> Option<Ts> {
        let (secs, inc) = pitr_archive::names::mongo::parse_ts(s)?;
        Some(Ts { secs, inc })
    }

    /// `ts:SECONDS:INC`, as `--to` takes it.
    pub fn parse_arg(s: &str) -> Option<Ts> {
        let rest = s.trim().strip_prefix("ts:")?;
        let (secs, inc) = rest.split_once(':')?;
        Some(Ts { secs: secs.parse().ok()?, inc: inc.parse().ok()? })
    }

    /// The `ts` just before this one in MongoDB's order (a `ts` is one 64-bit number, seconds in
    /// the high half): nothing can lie strictly between the two, so "after `t.pred()`" means
    /// "from `t` on".
    pub fn pred(self) -> Ts {
        match self.inc {
            0 => Ts { secs: self.secs.saturating_sub(1), inc: if self.secs == 0 { 0 } else { u32::MAX } },
            inc => Ts { secs: self.secs, inc: inc - 1 },
        }
    }

    /// The second of the timestamp, µs since the Unix epoch (an upper bound on the entry's wall
    /// time to within a second, where an entry carries no `wall`).
    pub fn secs_us(self) -> i64 {
        i64::from(self.secs) * 1_000_000
    }
}

impl fmt::Display for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ts:{}:{}", self.secs, self.inc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_ts_order_and_round_trip() {
        let a = Ts { secs: 9, inc: 20 };
        let b = Ts { secs: 10, inc: 1 };
        assert!(a < b);
        assert!(a.to_name() < b.to_name());
        assert_eq!(Ts::from_name(&a.to_name()), Some(a));
        assert_eq!(Ts::from_name("12.3"), None);
        assert_eq!(Ts::parse_arg("ts:1796162730:16"), Some(Ts { secs: 1796162730, inc: 16 }));
        assert_eq!(Ts::parse_arg("ts:1:x"), None);
        assert_eq!(Ts { secs: 5, inc: 6 }.to_string(), "ts:5:6");
        assert_eq!(Ts { secs: 5, inc: 6 }.pred(), Ts { secs: 5, inc: 5 });
        assert_eq!(Ts { secs: 5, inc: 0 }.pred(), Ts { secs: 4, inc: u32::MAX });
        assert_eq!(Ts::ZERO.pred(), Ts::ZERO);
    }
}
