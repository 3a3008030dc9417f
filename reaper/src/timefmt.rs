//! Times and durations as people write them: `300ms`, `1h30m`, RFC 3339
//! timestamps. Pure functions, no clock.

#![forbid(unsafe_code)]

use std::fmt;

/// Nanoseconds in common units.
pub const NS_PER_US: u64 = 1_000;
pub const NS_PER_MS: u64 = 1_000_000;
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Text that is not a duration or a time; the message names the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextError(pub String);

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TextError {}

fn err<T>(msg: impl Into<String>) -> Result<T, TextError> {
    Err(TextError(msg.into()))
}

/// Parses a duration such as `300ms`, `30s`, `10m`, `2h`, `1d` or `1h30m`.
/// A bare number is seconds. Whitespace between parts is allowed.
pub fn parse_duration(text: &str) -> Result<u64, TextError> {
    let s = text.trim();
    if s.is_empty() {
        return err("empty duration");
    }
    if let Ok(secs) = s.parse::<f64>() {
        return seconds_to_ns(secs).map_err(|e| TextError(format!("duration {text:?}: {e}")));
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return err(format!(
                "duration {text:?}: expected a number at {rest:?} (e.g. 300ms, 30s, 10m, 2h, 1d)"
            ));
        }
        let number: f64 = rest[..digits].parse().map_err(|_| {
            TextError(format!(
                "duration {text:?}: bad number {:?}",
                &rest[..digits]
            ))
        })?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1,
            "us" | "µs" => NS_PER_US,
            "ms" => NS_PER_MS,
            "s" | "sec" | "secs" => NS_PER_SEC,
            "m" | "min" | "mins" => 60 * NS_PER_SEC,
            "h" | "hr" | "hrs" => 3_600 * NS_PER_SEC,
            "d" | "day" | "days" => 86_400 * NS_PER_SEC,
            "" => return err(format!("duration {text:?}: missing unit after {number}")),
            other => {
                return err(format!(
                    "duration {text:?}: unknown unit {other:?} (use ns, us, ms, s, m, h, d)"
                ))
            }
        };
        let part = number * scale as f64;
        if !part.is_finite() || part > u64::MAX as f64 {
            return err(format!("duration {text:?} is too large"));
        }
        total = total
            .checked_add(part as u64)
            .ok_or_else(|| TextError(format!("duration {text:?} is too large")))?;
    }
    Ok(total)
}

/// Converts seconds (as JSON numbers carry them) to nanoseconds.
pub fn seconds_to_ns(secs: f64) -> Result<u64, TextError> {
    if !secs.is_finite() {
        return err("not a finite number of seconds");
    }
    if secs < 0.0 {
        return err(format!("{secs} is negative"));
    }
    let ns = secs * NS_PER_SEC as f64;
    if ns > u64::MAX as f64 {
        return err(format!("{secs} seconds is too large"));
    }
    Ok(ns as u64)
}

/// Renders nanoseconds the way `parse_duration` reads them, to the
/// millisecond: `1h2m3.004s`.
pub fn format_duration(ns: u64) -> String {
    let ms = ns / NS_PER_MS;
    let (d, rem) = (ms / 86_400_000, ms % 86_400_000);
    let (h, rem) = (rem / 3_600_000, rem % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let (s, ms) = (rem / 1000, rem % 1000);
    let mut out = String::new();
    if d > 0 {
        out += &format!("{d}d");
    }
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 || ms > 0 || out.is_empty() {
        if ms > 0 {
            out += &format!("{s}.{ms:03}s");
        } else {
            out += &format!("{s}s");
        }
    }
    out
}

/// Parses an RFC 3339 timestamp (`2026-11-22T10:00:00Z`,
/// `2026-11-22T12:00:00.5+02:00`) to Unix nanoseconds.
pub fn parse_rfc3339(text: &str) -> Result<i128, TextError> {
    let bad = |why: &str| TextError(format!("{text:?} is not an RFC 3339 time: {why}"));
    let b = text.as_bytes();
    if b.len() < 20 {
        return Err(bad("too short (expected e.g. 2026-11-22T10:00:00Z)"));
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, TextError> {
        let part = &text[range];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad(&format!("{part:?} is not a number")));
        }
        part.parse().map_err(|_| bad("bad number"))
    };
    for (pos, ch) in [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')] {
        if b[pos] != ch {
            return Err(bad(&format!("expected {:?} at byte {pos}", ch as char)));
        }
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad("expected 'T' between date and time"));
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such time of day"));
    }
    let mut pos = 19;
    let mut frac_ns: i64 = 0;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while pos < b.len() && b[pos].is_ascii_digit() {
            pos += 1;
        }
        if pos == start {
            return Err(bad("empty fraction of a second"));
        }
        let digits = &text[start..pos.min(start + 9)];
        frac_ns = digits.parse::<i64>().map_err(|_| bad("bad fraction"))?
            * 10i64.pow(9 - digits.len() as u32);
    }
    let offset_secs: i64 = match &text[pos..] {
        "Z" | "z" => 0,
        off if off.len() == 6 && (off.starts_with('+') || off.starts_with('-')) => {
            if off.as_bytes()[3] != b':' {
                return Err(bad("offset must look like +02:00"));
            }
            let h = num(pos + 1..pos + 3)?;
            let m = num(pos + 4..pos + 6)?;
            if h > 23 || m > 59 {
                return Err(bad("no such offset"));
            }
            let sign = if off.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        "" => return Err(bad("missing time zone (add Z or an offset like +02:00)")),
        other => return Err(bad(&format!("unexpected {other:?} after the time"))),
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Ok(secs as i128 * NS_PER_SEC as i128 + frac_ns as i128)
}

/// Formats Unix nanoseconds as RFC 3339 in UTC with microseconds.
pub fn format_rfc3339(unix_ns: i128) -> String {
    Rfc3339(unix_ns).to_string()
}

/// Unix nanoseconds shown as RFC 3339 in UTC with microseconds, written
/// without an allocation: an audit line carries one per killed flow, and a
/// mass expiry writes 100k of them at once.
#[derive(Clone, Copy, Debug)]
pub struct Rfc3339(pub i128);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.div_euclid(NS_PER_SEC as i128) as i64;
        let micros = (self.0.rem_euclid(NS_PER_SEC as i128) / NS_PER_US as i128) as u64;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u64;
        let (y, m, d) = civil_from_days(days);
        if !(0..=9999).contains(&y) {
            return f.write_str(&format_rfc3339_slow(self.0));
        }
        // "YYYY-MM-DDThh:mm:ss.uuuuuuZ": each field's digits into place.
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        let mut put = |at: usize, width: usize, mut value: u64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, y as u64);
        put(5, 2, m as u64);
        put(8, 2, d as u64);
        put(11, 2, sod / 3600);
        put(14, 2, sod % 3600 / 60);
        put(17, 2, sod % 60);
        put(20, 6, micros);
        f.write_str(std::str::from_utf8(&out).expect("ASCII digits"))
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The general form (years outside 0..=9999 included).
fn format_rfc3339_slow(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(NS_PER_SEC as i128) as i64;
    let micros = (unix_ns.rem_euclid(NS_PER_SEC as i128) / NS_PER_US as i128) as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        _ => 28,
    }
}

// Howard Hinnant's days-from-civil / civil-from-days (public domain algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("300ms").unwrap(), 300 * NS_PER_MS);
        assert_eq!(parse_duration("30").unwrap(), 30 * NS_PER_SEC);
        assert_eq!(parse_duration("0.5").unwrap(), NS_PER_SEC / 2);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400 * NS_PER_SEC);
        assert_eq!(parse_duration("1h 30m").unwrap(), 5400 * NS_PER_SEC);
        assert_eq!(parse_duration("2d").unwrap(), 2 * 86_400 * NS_PER_SEC);
        assert_eq!(parse_duration("1.5s").unwrap(), 1_500 * NS_PER_MS);
    }

    #[test]
    fn durations_refuse_nonsense() {
        for bad in ["", "abc", "10x", "-5s", "5s s", "1e400", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_duration("-5").unwrap_err().0.contains("negative"));
        assert!(parse_duration("10x")
            .unwrap_err()
            .0
            .contains("unknown unit"));
    }

    #[test]
    fn durations_format_round_trip() {
        for ns in [
            0,
            300 * NS_PER_MS,
            59 * NS_PER_SEC,
            3723 * NS_PER_SEC + 4 * NS_PER_MS,
        ] {
            assert_eq!(parse_duration(&format_duration(ns)).unwrap(), ns);
        }
        assert_eq!(format_duration(90 * NS_PER_SEC), "1m30s");
    }

    #[test]
    fn rfc3339_parses_offsets_and_fractions() {
        let z = parse_rfc3339("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(z, 1_795_341_600 * NS_PER_SEC as i128);
        let off = parse_rfc3339("2026-11-22T12:00:00+02:00").unwrap();
        assert_eq!(off, z);
        let frac = parse_rfc3339("2026-11-22T10:00:00.25Z").unwrap();
        assert_eq!(frac - z, 250 * NS_PER_MS as i128);
        let epoch = parse_rfc3339("1970-01-01T00:00:00Z").unwrap();
        assert_eq!(epoch, 0);
    }

    #[test]
    fn rfc3339_refuses_nonsense() {
        for bad in [
            "2026-11-22",
            "2026-11-22T10:00:00",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-22T25:00:00Z",
            "2026-11-22T10:00:00+0200",
            "2026-11-22T10:00:00Zjunk",
            "yesterday at noon, roughly",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn rfc3339_formats_what_it_parses() {
        let t = parse_rfc3339("2024-02-29T23:59:59.123456Z").unwrap();
        assert_eq!(format_rfc3339(t), "2024-02-29T23:59:59.123456Z");
        assert_eq!(
            format_rfc3339(-(NS_PER_SEC as i128)),
            "1969-12-31T23:59:59.000000Z"
        );
    }

    #[test]
    fn rfc3339_fast_form_matches_the_general_one() {
        // Instants from 1970 to past 9999 in uneven steps, and the edges.
        let mut t: i128 = -3;
        while t < 300_000_000_000 * NS_PER_SEC as i128 {
            assert_eq!(Rfc3339(t).to_string(), format_rfc3339_slow(t), "at {t} ns");
            t = t * 3 + 987_654_321_123;
        }
        let y10k = parse_rfc3339("9999-12-31T23:59:59.999999Z").unwrap();
        assert_eq!(format_rfc3339(y10k), "9999-12-31T23:59:59.999999Z");
        let past = y10k + NS_PER_SEC as i128;
        assert_eq!(format_rfc3339(past), format_rfc3339_slow(past));
        assert!(format_rfc3339(past).starts_with("10000-"));
    }
}
