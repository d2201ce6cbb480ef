//! The two facts the loader needs from the kernel's BTF (/sys/kernel/btf/vmlinux): the type
//! id of a kernel function (a kfunc is called by it) and the bit offset of a struct member,
//! found through anonymous structs and unions. A reader of the BTF format (`btf.rst` in the
//! kernel documentation) limited to that.

use std::path::Path;

/// Why a BTF question has no answer.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF type section is truncated or has an unknown kind {0}")]
    BadType(u32),
    #[error("{0} is not in the kernel's BTF")]
    NotFound(String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;

/// One parsed type: what the queries below need of it.
struct Type {
    name_off: u32,
    kind: u32,
    /// Set on structs and unions: member bit offsets then carry the bitfield size in the top
    /// 8 bits.
    kind_flag: bool,
    /// (name offset, type id, bit offset) of struct and union members.
    members: Vec<(u32, u32, u32)>,
}

/// Parsed BTF: types by id (id 0 is void) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF (what x86-64 and arm64 kernels expose).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::BadHeader);
        }
        let field = |i: usize| u32_at(data, 8 + 4 * i).map(|v| v as usize);
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) = (
            u32_at(data, 4).map(|v| v as usize),
            field(0),
            field(1),
            field(2),
            field(3),
        ) else {
            return Err(BtfError::BadHeader);
        };
        let types_at = hdr_len + type_off;
        let strings_at = hdr_len + str_off;
        let (Some(type_data), Some(strings)) = (
            data.get(types_at..types_at + type_len),
            data.get(strings_at..strings_at + str_len),
        ) else {
            return Err(BtfError::BadHeader);
        };
        Ok(Self {
            types: parse_types(type_data)?,
            strings: strings.to_vec(),
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        (1..self.types.len()).find_map(|id| {
            let t = &self.types[id];
            (t.kind == kind && self.name(t.name_off) == name.as_bytes()).then_some(id as u32)
        })
    }

    /// Type id of the kernel function `name`.
    pub fn function_id(&self, name: &str) -> Result<u32, BtfError> {
        self.find(KIND_FUNC, name)
            .ok_or_else(|| BtfError::NotFound(format!("function {name}")))
    }

    /// Bit offset of `member` in `struct name`, looking inside anonymous structs and unions.
    pub fn member_bit_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::NotFound(format!("struct {name} member {member}"));
        let id = self.find(KIND_STRUCT, name).ok_or_else(not_found)?;
        self.member_in(id, member.as_bytes(), 0)
            .ok_or_else(not_found)
    }

    fn member_in(&self, id: u32, member: &[u8], depth: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for &(name_off, type_id, raw_offset) in &t.members {
            let offset = if t.kind_flag {
                raw_offset & 0x00ff_ffff
            } else {
                raw_offset
            };
            if self.name(name_off) == member {
                return Some(offset);
            }
            if name_off == 0 {
                if let Some(inner) = self.member_in(type_id, member, depth + 1) {
                    return Some(offset + inner);
                }
            }
        }
        None
    }
}

/// Walks the type section: every kind's fixed part, and the members of structs and unions.
fn parse_types(data: &[u8]) -> Result<Vec<Type>, BtfError> {
    let mut types = vec![Type {
        name_off: 0,
        kind: 0,
        kind_flag: false,
        members: Vec::new(),
    }];
    let mut at = 0;
    while at < data.len() {
        let (Some(name_off), Some(info)) = (u32_at(data, at), u32_at(data, at + 4)) else {
            return Err(BtfError::BadType(0));
        };
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        at += 12;
        let extra = match kind {
            // INT, VAR, DECL_TAG: one word.
            1 | 14 | 17 => 4,
            // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: none.
            2 | 7..=12 | 16 | 18 => 0,
            // ARRAY.
            3 => 12,
            // STRUCT, UNION, DATASEC, ENUM64: 12 bytes an entry; ENUM, FUNC_PROTO: 8.
            4 | 5 | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            other => return Err(BtfError::BadType(other)),
        };
        let mut members = Vec::new();
        if matches!(kind, KIND_STRUCT | KIND_UNION) {
            for m in 0..vlen {
                let base = at + 12 * m;
                let (Some(name), Some(ty), Some(offset)) = (
                    u32_at(data, base),
                    u32_at(data, base + 4),
                    u32_at(data, base + 8),
                ) else {
                    return Err(BtfError::BadType(kind));
                };
                members.push((name, ty, offset));
            }
        }
        at += extra;
        if at > data.len() {
            return Err(BtfError::BadType(kind));
        }
        types.push(Type {
            name_off,
            kind,
            kind_flag: info >> 31 != 0,
            members,
        });
    }
    Ok(types)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BTF with `struct outer { int a; union { struct { int x:3; int y:2; }; long z; }; }`
    /// and a function `f`.
    fn sample() -> Vec<u8> {
        let strings = b"\0outer\0a\0x\0y\0z\0f\0int\0".to_vec();
        let (outer, member_a, member_x, member_y, member_z, func_f, int) =
            (1, 7, 9, 11, 13, 15, 17);
        let word = |v: u32| v.to_le_bytes();
        let mut types = Vec::new();
        let mut ty = |name: u32, info: u32, size: u32, extra: &[[u8; 4]]| {
            for w in [word(name), word(info), word(size)].iter().chain(extra) {
                types.extend_from_slice(w);
            }
        };
        // 1: int
        ty(int, 1 << 24, 4, &[word(32)]);
        // 2: anonymous struct { x:3 at bit 0, y:2 at bit 3 } (kind_flag: bitfield sizes)
        ty(
            0,
            (1 << 31) | (4 << 24) | 2,
            4,
            &[
                word(member_x),
                word(1),
                word(3 << 24),
                word(member_y),
                word(1),
                word((2 << 24) | 3),
            ],
        );
        // 3: anonymous union { struct 2; z: int }
        ty(
            0,
            (5 << 24) | 2,
            8,
            &[word(0), word(2), word(0), word(member_z), word(1), word(0)],
        );
        // 4: struct outer { a at 0; union 3 at bit 64 }
        ty(
            outer,
            (4 << 24) | 2,
            16,
            &[word(member_a), word(1), word(0), word(0), word(3), word(64)],
        );
        // 5: func proto (no params), 6: func f
        ty(0, 13 << 24, 0, &[]);
        ty(func_f, 12 << 24, 5, &[]);
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for v in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn finds_functions_and_nested_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.function_id("f").unwrap(), 6);
        assert_eq!(btf.member_bit_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_bit_offset("outer", "x").unwrap(), 64);
        assert_eq!(btf.member_bit_offset("outer", "y").unwrap(), 67);
        assert_eq!(btf.member_bit_offset("outer", "z").unwrap(), 64);
        assert!(matches!(
            btf.member_bit_offset("outer", "w"),
            Err(BtfError::NotFound(_))
        ));
        assert!(matches!(btf.function_id("g"), Err(BtfError::NotFound(_))));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Btf::parse(b"not btf at all, not at all"),
            Err(BtfError::BadHeader)
        ));
        let mut truncated = sample();
        truncated[12] = 0xff; // type_len far beyond the data
        assert!(Btf::parse(&truncated).is_err());
    }

    /// A test that cannot run here says so loudly and is recorded in `$DATAPATH_SKIP_LOG`,
    /// which `cargo xtask test` counts against the skips it expects (none): libtest would
    /// count it as passed.
    fn skipped(test: &str, reason: &str) {
        use std::io::Write as _;
        eprintln!("SKIPPED: {test}: {reason}");
        if let Some(log) = std::env::var_os("DATAPATH_SKIP_LOG") {
            let line = format!("{test}: {reason}\n");
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .and_then(|mut f| f.write_all(line.as_bytes()));
        }
    }

    #[test]
    fn reads_the_running_kernel() {
        let Ok(btf) = Btf::kernel() else {
            skipped(
                "btf::reads_the_running_kernel",
                "no /sys/kernel/btf/vmlinux",
            );
            return;
        };
        let bit = btf.member_bit_offset("sk_buff", "ip_summed").unwrap();
        assert!(bit > 0 && bit < 8 * 256, "ip_summed at bit {bit}");
        assert!(btf.function_id("bpf_cast_to_kern_ctx").unwrap() > 0);
    }
}
