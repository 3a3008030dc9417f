//! Where a field is in a kernel struct, read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`). The kernel programs are built without
//! relocations for the running kernel's layout, so the one field they read
//! from a kernel struct directly (`struct sock`'s `sk_uid`, the socket's
//! owner) gets its offset from here, at load; the verifier then checks
//! that load against the same BTF.
//!
//! Only what that needs is read, a buffer at a time: the string section,
//! for where the two names are, then the type section's records, to step
//! over each kind and read the members of the struct. (The whole file is
//! 5-6 MiB; read into one buffer, it stayed in the daemon's heap after,
//! +10 MiB of RSS.)

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const HEADER_LEN: usize = 24;
const READ_BUFFER: usize = 64 * 1024;

/// The byte offset of member `member` in struct `name`, if the BTF at
/// `path` has that struct with that member at a whole byte.
pub fn member_offset_in(path: &Path, name: &str, member: &str) -> Result<u32, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    member_offset(file, name, member).map_err(|e| format!("{}: {e}", path.display()))
}

fn io_error(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "BTF ends inside a section".into()
    } else {
        e.to_string()
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// `member_offset_in` on any BTF source (native endianness, as the
/// kernel's).
pub fn member_offset(mut btf: impl Read + Seek, name: &str, member: &str) -> Result<u32, String> {
    let mut header = [0u8; HEADER_LEN];
    btf.read_exact(&mut header)
        .map_err(|_| "BTF ends inside its header".to_string())?;
    if u16::from_ne_bytes([header[0], header[1]]) != MAGIC {
        return Err("not BTF (bad magic)".into());
    }
    let header_len = u64::from(u32_at(&header, 4));
    let (type_off, type_len) = (u32_at(&header, 8), u32_at(&header, 12));
    let (str_off, str_len) = (u32_at(&header, 16), u32_at(&header, 20));

    // Where the two names are in the string section (each, as a rule,
    // once: the kernel's strings are deduplicated).
    btf.seek(SeekFrom::Start(header_len + u64::from(str_off)))
        .map_err(io_error)?;
    let mut strings = BufReader::with_capacity(READ_BUFFER, (&mut btf).take(str_len.into()));
    let (mut names, mut members) = (Vec::new(), Vec::new());
    let (mut at, mut string) = (0u32, Vec::new());
    loop {
        string.clear();
        let n = strings.read_until(0, &mut string).map_err(io_error)?;
        if n == 0 {
            break;
        }
        let text = string.strip_suffix(&[0]).unwrap_or(&string);
        if text == name.as_bytes() {
            names.push(at);
        }
        if text == member.as_bytes() {
            members.push(at);
        }
        at += n as u32;
    }
    drop(strings);
    let missing = || format!("the kernel's BTF has no {name}.{member}");
    if names.is_empty() || members.is_empty() {
        return Err(missing());
    }

    btf.seek(SeekFrom::Start(header_len + u64::from(type_off)))
        .map_err(io_error)?;
    let mut types = BufReader::with_capacity(READ_BUFFER, (&mut btf).take(type_len.into()));
    let mut record = [0u8; 12];
    loop {
        match types.fill_buf().map_err(io_error)? {
            [] => return Err(missing()),
            _ => types.read_exact(&mut record).map_err(io_error)?,
        }
        let (name_off, info) = (u32_at(&record, 0), u32_at(&record, 4));
        let kind = (info >> 24) & 0x1f;
        let vlen = u64::from(info & 0xffff);
        let bitfields = info >> 31 == 1;
        if kind == KIND_STRUCT && names.contains(&name_off) {
            for _ in 0..vlen {
                types.read_exact(&mut record).map_err(io_error)?;
                if !members.contains(&u32_at(&record, 0)) {
                    continue;
                }
                let offset = u32_at(&record, 8);
                let bits = if bitfields {
                    offset & 0xff_ffff
                } else {
                    offset
                };
                if bits % 8 != 0 {
                    return Err(format!("{name}.{member} is a bitfield"));
                }
                return Ok(bits / 8);
            }
            // A struct of that name without the member: keep looking (a
            // module's BTF may have another), then say it is missing.
            continue;
        }
        let more = match kind {
            // int, var, decl_tag: one u32 after the record.
            1 | 14 | 17 => 4,
            // array: element type, index type, length.
            3 => 12,
            // struct, union, datasec, enum64: vlen × 12 bytes.
            4 | 5 | 15 | 19 => vlen * 12,
            // enum, func_proto: vlen × 8 bytes.
            6 | 13 => vlen * 8,
            // ptr, fwd, typedef, volatile, const, restrict, func, float,
            // type_tag: nothing more.
            2 | 7..=12 | 16 | 18 => 0,
            other => return Err(format!("BTF kind {other} is unknown here")),
        };
        let skipped =
            std::io::copy(&mut (&mut types).take(more), &mut std::io::sink()).map_err(io_error)?;
        if skipped < more {
            return Err("BTF ends inside a section".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn offset(data: &[u8]) -> Result<u32, String> {
        member_offset(Cursor::new(data), "sock", "sk_uid")
    }

    /// BTF bytes with `types` (each a record and what follows it) and
    /// `strings` (NUL-separated, the first empty).
    fn btf(types: &[Vec<u32>], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types
            .iter()
            .flatten()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_ne_bytes());
        out.extend([1u8, 0]);
        for word in [
            24,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(word.to_ne_bytes());
        }
        out.extend(type_bytes);
        out.extend(strings);
        out
    }

    // Strings: 1 "int", 5 "sock", 10 "sk_uid", 17 "other", 23 "kuid_t".
    const STRINGS: &[u8] = b"\0int\0sock\0sk_uid\0other\0kuid_t\0";

    fn int() -> Vec<u32> {
        vec![1, 1 << 24, 4, 32]
    }

    fn structure(name: u32, bitfields: bool, members: &[(u32, u32)]) -> Vec<u32> {
        let info = (KIND_STRUCT << 24) | members.len() as u32 | if bitfields { 1 << 31 } else { 0 };
        let mut record = vec![name, info, 64];
        for &(member_name, offset) in members {
            record.extend([member_name, 1, offset]);
        }
        record
    }

    #[test]
    fn a_members_offset_is_found_past_other_kinds() {
        let data = btf(
            &[
                int(),
                vec![0, 2 << 24, 1],                  // ptr
                vec![0, 3 << 24, 0, 1, 1, 8],         // array
                vec![23, 6 << 24 | 2, 4, 1, 0, 5, 1], // enum of two
                structure(17, false, &[(10, 32)]),    // "other" has an sk_uid too
                structure(5, false, &[(17, 0), (10, 96)]),
            ],
            STRINGS,
        );
        assert_eq!(offset(&data), Ok(12));
    }

    #[test]
    fn a_member_in_a_struct_with_bitfields_reads_its_offset_bits() {
        let data = btf(
            &[int(), structure(5, true, &[(10, (3 << 24) | 640)])],
            STRINGS,
        );
        assert_eq!(offset(&data), Ok(80));
    }

    #[test]
    fn a_missing_member_a_bitfield_and_bad_bytes_are_errors() {
        let data = btf(&[structure(5, false, &[(17, 0)])], STRINGS);
        let err = offset(&data).unwrap_err();
        assert!(err.contains("no sock.sk_uid"), "{err}");
        let data = btf(&[structure(5, true, &[(10, (1 << 24) | 3)])], STRINGS);
        assert!(offset(&data).unwrap_err().contains("bitfield"));
        assert!(offset(&[0; 24]).unwrap_err().contains("magic"));
        assert!(offset(b"\0\0").unwrap_err().contains("header"));
        let mut data = btf(&[int()], STRINGS);
        data.truncate(30);
        assert!(offset(&data).is_err());
        let data = btf(&[vec![0, 30 << 24, 0]], STRINGS);
        assert!(offset(&data).unwrap_err().contains("kind 30"));
    }
}
