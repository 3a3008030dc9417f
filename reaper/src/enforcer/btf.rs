//! Where a field is in a kernel struct, read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`). The kernel programs are built without
//! relocations for the running kernel's layout, so the one field they read
//! from a kernel struct directly (`struct sock`'s `sk_uid`, the socket's
//! owner) gets its offset from here, at load; the verifier then checks
//! that load against the same BTF.
//!
//! Only what that needs is parsed: the type section's records, to step
//! over each kind and read the members of structs.

#![forbid(unsafe_code)]

use std::path::Path;

/// The kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// The byte offset of member `member` in struct `name`, if the BTF at
/// `path` has that struct with that member at a whole byte.
pub fn member_offset_in(path: &Path, name: &str, member: &str) -> Result<u32, String> {
    let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    member_offset(&data, name, member)
}

/// `member_offset_in` on BTF bytes (native endianness, as the kernel's).
pub fn member_offset(data: &[u8], name: &str, member: &str) -> Result<u32, String> {
    let u16_at = |at: usize| -> Result<u16, String> {
        data.get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .ok_or_else(|| "BTF ends inside its header".to_string())
    };
    let u32_at = |at: usize| -> Result<u32, String> {
        data.get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("BTF ends at byte {at}, inside a record"))
    };
    if u16_at(0)? != MAGIC {
        return Err("not BTF (bad magic)".into());
    }
    let header_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let strings = data
        .get(header_len + str_off..header_len + str_off + str_len)
        .ok_or("BTF's string section is past its end")?;
    let string_at = |offset: u32| -> &[u8] {
        let rest = strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let types = header_len + type_off;
    let end = types + type_len;
    if end > data.len() {
        return Err("BTF's type section is past its end".into());
    }
    let mut at = types;
    while at < end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let bitfields = info >> 31 == 1;
        at += 12;
        if kind == KIND_STRUCT && string_at(name_off) == name.as_bytes() {
            for m in 0..vlen {
                let record = at + m * 12;
                if string_at(u32_at(record)?) != member.as_bytes() {
                    continue;
                }
                let offset = u32_at(record + 8)?;
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
        }
        at += match kind {
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
    }
    Err(format!("the kernel's BTF has no {name}.{member}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(member_offset(&data, "sock", "sk_uid"), Ok(12));
    }

    #[test]
    fn a_member_in_a_struct_with_bitfields_reads_its_offset_bits() {
        let data = btf(
            &[int(), structure(5, true, &[(10, (3 << 24) | 640)])],
            STRINGS,
        );
        assert_eq!(member_offset(&data, "sock", "sk_uid"), Ok(80));
    }

    #[test]
    fn a_missing_member_a_bitfield_and_bad_bytes_are_errors() {
        let data = btf(&[structure(5, false, &[(17, 0)])], STRINGS);
        let err = member_offset(&data, "sock", "sk_uid").unwrap_err();
        assert!(err.contains("no sock.sk_uid"), "{err}");
        let data = btf(&[structure(5, true, &[(10, (1 << 24) | 3)])], STRINGS);
        assert!(member_offset(&data, "sock", "sk_uid")
            .unwrap_err()
            .contains("bitfield"));
        assert!(member_offset(b"\0\0", "sock", "sk_uid")
            .unwrap_err()
            .contains("magic"));
        let mut data = btf(&[int()], STRINGS);
        data.truncate(30);
        assert!(member_offset(&data, "sock", "sk_uid").is_err());
        let data = btf(&[vec![0, 30 << 24, 0]], STRINGS);
        assert!(member_offset(&data, "sock", "sk_uid")
            .unwrap_err()
            .contains("kind 30"));
    }
}
