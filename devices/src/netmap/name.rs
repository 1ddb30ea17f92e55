//! Port names: parsing `netmap:eth0^`, `vale0:vm1`, `netmap:p{1`, `shm:demo{0`
//! and friends into a typed [`PortSpec`].
//!
//! Kernel forms follow libnetmap's syntax `subsystem:vpname[mode][options]`:
//!
//! | name | `nr_name` | `nr_mode` | other |
//! |---|---|---|---|
//! | `netmap:eth0` | `eth0` | `ALL_NIC` | |
//! | `netmap:eth0^` | `eth0` | `SW` | |
//! | `netmap:eth0^N` | `eth0` | `ONE_SW` | `nr_ringid = N` |
//! | `netmap:eth0*` | `eth0` | `NIC_SW` | |
//! | `netmap:eth0-N` | `eth0` | `ONE_NIC` | `nr_ringid = N` |
//! | `…@N` | | | `nr_mem_id = N` |
//! | `…/xztrRT` | | | `nr_flags`: x EXCLUSIVE, z ZCOPY_MON, t/r MONITOR_TX/RX, R/T RX/TX_RINGS_ONLY |
//! | `…@opt…` (`@` + non-digit) | | | option string kept as-is |
//! | `valeSW:PORT` | `valeSW:PORT` | `ALL_NIC` | `SW` may be empty |
//! | `netmap:eth0{1`, `netmap:eth0}1` | `eth0{1` | `ALL_NIC` | pipe id stays in the name |
//!
//! The interface part ends at the first of `- * ^ / @`, so a `-` cannot
//! appear in a name. `nr_name` is at most 63 characters.
//!
//! Userspace ports (see `shm.rs`): `shm:NAME{ID` (end A) and `shm:NAME}ID`
//! (end B), NAME and ID non-empty runs of letters, digits and `_`, the whole
//! name at most 63 characters, no suffixes.

use super::abi::{
    NETMAP_REQ_IFNAMSIZ, NETMAP_RING_MASK, NR_EXCLUSIVE, NR_MONITOR_RX, NR_MONITOR_TX,
    NR_REG_ALL_NIC, NR_REG_NIC_SW, NR_REG_ONE_NIC, NR_REG_ONE_SW, NR_REG_SW, NR_RX_RINGS_ONLY,
    NR_TX_RINGS_ONLY, NR_ZCOPY_MON,
};

/// The accepted forms, shown in every parse error.
pub const ACCEPTED_FORMS: &str = "netmap:IFNAME[^|^N|*|-N][@MEMID][/xztrRT][@OPTION...], \
     valeSW:PORT[...same suffixes], netmap:IFNAME{ID or netmap:IFNAME}ID (kernel pipes), \
     shm:NAME{ID or shm:NAME}ID (userspace pipe ends A and B; NAME and ID are letters, \
     digits or _), at most 63 characters";

/// Longest `nr_name` (and longest `shm:` name).
pub const MAX_NAME_LEN: usize = NETMAP_REQ_IFNAMSIZ - 1;

/// What a port name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// A port of the kernel netmap module (`/dev/netmap`).
    Kernel(KernelSpec),
    /// One end of a userspace netmap pipe.
    Shm(ShmSpec),
}

/// Which kind of kernel port a name designates (informational; the kernel
/// only sees [`KernelSpec::nr_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelPortKind {
    /// A NIC (or any non-VALE port) by interface name.
    Nic {
        /// Interface name.
        ifname: String,
    },
    /// A VALE switch port.
    Vale {
        /// Switch name after `vale` (may be empty).
        switch: String,
        /// Port name.
        port: String,
    },
}

/// A netmap pipe suffix: `{ID` (master) or `}ID` (slave).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeSuffix {
    /// The end of the pipe.
    pub end: PipeEnd,
    /// The pipe id.
    pub id: String,
}

/// The end of a pipe: `{` is end A (netmap's master), `}` is end B (slave).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PipeEnd {
    /// `{`.
    A,
    /// `}`.
    B,
}

impl PipeEnd {
    /// 0 for A, 1 for B.
    #[inline]
    pub fn index(self) -> usize {
        match self {
            PipeEnd::A => 0,
            PipeEnd::B => 1,
        }
    }

    /// The other end.
    #[inline]
    pub fn peer(self) -> PipeEnd {
        match self {
            PipeEnd::A => PipeEnd::B,
            PipeEnd::B => PipeEnd::A,
        }
    }

    /// The separator character of this end.
    pub fn separator(self) -> char {
        match self {
            PipeEnd::A => '{',
            PipeEnd::B => '}',
        }
    }
}

/// What a `NETMAP_REQ_REGISTER` needs, parsed from a kernel port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpec {
    /// The name as given.
    pub full_name: String,
    /// `nmreq_header.nr_name` (≤ 63 bytes, pipe suffix included).
    pub nr_name: String,
    /// What the name designates.
    pub kind: KernelPortKind,
    /// Pipe suffix, if any (also kept inside `nr_name`).
    pub pipe: Option<PipeSuffix>,
    /// `NR_REG_*`.
    pub nr_mode: u32,
    /// Ring number for `ONE_NIC` / `ONE_SW`, else 0.
    pub nr_ringid: u16,
    /// Memory region id (`@N`), 0 if not given.
    pub nr_mem_id: u16,
    /// `NR_*` flags from the `/` suffix.
    pub nr_flags: u64,
    /// `@option` strings, without the `@`, kept as-is.
    pub options: Vec<String>,
}

impl KernelSpec {
    /// `nr_name` as the NUL-terminated byte array of `nmreq_header`.
    pub fn nr_name_bytes(&self) -> [u8; NETMAP_REQ_IFNAMSIZ] {
        let mut out = [0u8; NETMAP_REQ_IFNAMSIZ];
        // The parser guarantees len <= 63, so the NUL always fits.
        let n = self.nr_name.len().min(MAX_NAME_LEN);
        out[..n].copy_from_slice(&self.nr_name.as_bytes()[..n]);
        out
    }
}

/// One end of a userspace pipe `shm:NAME{ID` / `shm:NAME}ID`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShmSpec {
    /// NAME.
    pub name: String,
    /// ID.
    pub id: String,
    /// Which end.
    pub end: PipeEnd,
}

impl ShmSpec {
    /// The port name of this end, e.g. `shm:demo{0`.
    pub fn port_name(&self) -> String {
        format!("shm:{}{}{}", self.name, self.end.separator(), self.id)
    }

    /// The port name of the other end.
    pub fn peer_name(&self) -> String {
        format!(
            "shm:{}{}{}",
            self.name,
            self.end.peer().separator(),
            self.id
        )
    }
}

/// What is wrong with a port name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameErrorKind {
    /// Empty string.
    #[error("the name is empty")]
    Empty,
    /// No known prefix.
    #[error("unknown prefix: a port name starts with `netmap:`, `vale` or `shm:`")]
    UnknownPrefix,
    /// Nothing after `netmap:`.
    #[error("the interface name is missing")]
    MissingIfName,
    /// A character that cannot appear where it does.
    #[error("character {ch:?} at position {pos} is not allowed {place}")]
    BadChar {
        /// The character.
        ch: char,
        /// Its byte position in the name.
        pos: usize,
        /// Where (e.g. "in an interface name").
        place: &'static str,
    },
    /// VALE name without `:PORT`.
    #[error("a VALE name is valeSWITCH:PORT; the `:PORT` part is missing")]
    ValeMissingPort,
    /// VALE name with an empty port.
    #[error("the VALE port name after `:` is empty")]
    ValeEmptyPort,
    /// `{` or `}` without an id.
    #[error("the pipe id after `{sep}` is empty")]
    EmptyPipeId {
        /// `{` or `}`.
        sep: char,
    },
    /// More than one `{`/`}`.
    #[error("more than one pipe separator (`{{` or `}}`)")]
    TwoPipeSeparators,
    /// `nr_name` longer than 63.
    #[error("{len} characters, more than the {MAX_NAME_LEN} netmap allows")]
    TooLong {
        /// Length found.
        len: usize,
    },
    /// `-` or `^N` with a bad number.
    #[error("ring number after `{sep}` must be 0..={NETMAP_RING_MASK}, found {text:?}")]
    BadRingNumber {
        /// `-` or `^`.
        sep: char,
        /// What followed.
        text: String,
    },
    /// Two of `^ * -`.
    #[error("more than one ring selector (`^`, `^N`, `*`, `-N`)")]
    TwoModes,
    /// Mode after `@`/`/`.
    #[error("the ring selector (`^`, `*`, `-N`) must come right after the interface name")]
    ModeNotFirst,
    /// `@N` out of range.
    #[error("memory id after `@` must be 0..=65535, found {text:?}")]
    BadMemId {
        /// What followed.
        text: String,
    },
    /// Two `@N`.
    #[error("more than one memory id (`@N`)")]
    TwoMemIds,
    /// Unknown `/` flag.
    #[error("unknown flag {flag:?} after `/` (accepted: x z t r R T)")]
    BadFlag {
        /// The flag.
        flag: char,
    },
    /// `/` with no flags.
    #[error("`/` must be followed by at least one flag (x z t r R T)")]
    EmptyFlags,
    /// Two `/`.
    #[error("more than one flag group (`/...`)")]
    TwoFlagGroups,
    /// `@` with nothing after it.
    #[error("`@` must be followed by a memory id or an option")]
    EmptyOption,
    /// `@N` or `/` after an option.
    #[error("`@N` and `/flags` must come before `@option` strings")]
    SuffixAfterOption,
    /// `shm:` name without `{`/`}`.
    #[error("a userspace port is shm:NAME{{ID or shm:NAME}}ID; the `{{ID`/`}}ID` part is missing")]
    ShmMissingEnd,
    /// `shm:` with empty NAME.
    #[error("the NAME of shm:NAME{{ID is empty")]
    ShmEmptyName,
    /// `shm:` with a suffix.
    #[error("userspace ports take no ring, memory or flag suffixes")]
    ShmSuffix,
}

/// A port name that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid netmap port name {name:?}: {kind}; accepted forms: {ACCEPTED_FORMS}")]
pub struct NameError {
    /// The name as given.
    pub name: String,
    /// What is wrong.
    pub kind: NameErrorKind,
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Characters accepted in a NIC name: letters, digits, `_` and `.` (VLANs).
fn is_ifname_char(c: char) -> bool {
    is_ident_char(c) || c == '.'
}

/// Checks that `s` (found at byte `base` of the full name) is an identifier.
fn check_ident(s: &str, base: usize, place: &'static str) -> Result<(), NameErrorKind> {
    match s.char_indices().find(|&(_, c)| !is_ident_char(c)) {
        Some((i, ch)) => Err(NameErrorKind::BadChar {
            ch,
            pos: base + i,
            place,
        }),
        None => Ok(()),
    }
}

/// Parses a port name.
pub fn parse(name: &str) -> Result<PortSpec, NameError> {
    parse_inner(name).map_err(|kind| NameError {
        name: name.to_string(),
        kind,
    })
}

fn parse_inner(name: &str) -> Result<PortSpec, NameErrorKind> {
    if name.is_empty() {
        return Err(NameErrorKind::Empty);
    }
    if let Some(rest) = name.strip_prefix("shm:") {
        return parse_shm(name, rest).map(PortSpec::Shm);
    }
    let (rest, base, vale) = if let Some(rest) = name.strip_prefix("netmap:") {
        (rest, "netmap:".len(), false)
    } else if name.starts_with("vale") {
        (name, 0, true)
    } else {
        return Err(NameErrorKind::UnknownPrefix);
    };
    parse_kernel(name, rest, base, vale).map(PortSpec::Kernel)
}

fn parse_shm(full: &str, rest: &str) -> Result<ShmSpec, NameErrorKind> {
    const BASE: usize = 4;
    if full.len() > MAX_NAME_LEN {
        return Err(NameErrorKind::TooLong { len: full.len() });
    }
    let Some(sep_pos) = rest.find(['{', '}']) else {
        check_ident(rest, BASE, "in the NAME of a shm: port")?;
        return Err(NameErrorKind::ShmMissingEnd);
    };
    let name = &rest[..sep_pos];
    let sep = rest.as_bytes()[sep_pos] as char;
    let id = &rest[sep_pos + 1..];
    if name.is_empty() {
        return Err(NameErrorKind::ShmEmptyName);
    }
    check_ident(name, BASE, "in the NAME of a shm: port")?;
    if id.is_empty() {
        return Err(NameErrorKind::EmptyPipeId { sep });
    }
    if let Some((i, ch)) = id.char_indices().find(|&(_, c)| !is_ident_char(c)) {
        if matches!(ch, '{' | '}') {
            return Err(NameErrorKind::TwoPipeSeparators);
        }
        if matches!(ch, '^' | '*' | '-' | '@' | '/') {
            return Err(NameErrorKind::ShmSuffix);
        }
        return Err(NameErrorKind::BadChar {
            ch,
            pos: BASE + sep_pos + 1 + i,
            place: "in the ID of a shm: port",
        });
    }
    Ok(ShmSpec {
        name: name.to_string(),
        id: id.to_string(),
        end: if sep == '{' { PipeEnd::A } else { PipeEnd::B },
    })
}

fn parse_kernel(
    full: &str,
    rest: &str,
    base: usize,
    vale: bool,
) -> Result<KernelSpec, NameErrorKind> {
    // The port part ends at the first mode/option separator.
    let end = rest.find(['-', '*', '^', '/', '@']).unwrap_or(rest.len());
    let port = &rest[..end];
    let suffix = &rest[end..];
    if port.is_empty() {
        return Err(NameErrorKind::MissingIfName);
    }
    if port.len() > MAX_NAME_LEN {
        return Err(NameErrorKind::TooLong { len: port.len() });
    }

    // Pipe suffix.
    let (ifpart, pipe) = match port.find(['{', '}']) {
        Some(p) => {
            let sep = port.as_bytes()[p] as char;
            let id = &port[p + 1..];
            if id.is_empty() {
                return Err(NameErrorKind::EmptyPipeId { sep });
            }
            if id.contains(['{', '}']) {
                return Err(NameErrorKind::TwoPipeSeparators);
            }
            check_ident(id, base + p + 1, "in a pipe id")?;
            let end = if sep == '{' { PipeEnd::A } else { PipeEnd::B };
            (
                &port[..p],
                Some(PipeSuffix {
                    end,
                    id: id.to_string(),
                }),
            )
        }
        None => (port, None),
    };

    let kind = if vale {
        let Some(colon) = ifpart.find(':') else {
            return Err(NameErrorKind::ValeMissingPort);
        };
        let switch = &ifpart["vale".len()..colon];
        let vport = &ifpart[colon + 1..];
        check_ident(switch, base + 4, "in a VALE switch name")?;
        if vport.is_empty() {
            return Err(NameErrorKind::ValeEmptyPort);
        }
        check_ident(vport, base + colon + 1, "in a VALE port name")?;
        KernelPortKind::Vale {
            switch: switch.to_string(),
            port: vport.to_string(),
        }
    } else {
        if ifpart.is_empty() {
            return Err(NameErrorKind::MissingIfName);
        }
        if let Some((i, ch)) = ifpart.char_indices().find(|&(_, c)| !is_ifname_char(c)) {
            return Err(NameErrorKind::BadChar {
                ch,
                pos: base + i,
                place: "in an interface name",
            });
        }
        KernelPortKind::Nic {
            ifname: ifpart.to_string(),
        }
    };

    let mut spec = KernelSpec {
        full_name: full.to_string(),
        nr_name: port.to_string(),
        kind,
        pipe,
        nr_mode: NR_REG_ALL_NIC,
        nr_ringid: 0,
        nr_mem_id: 0,
        nr_flags: 0,
        options: Vec::new(),
    };
    parse_suffix(&mut spec, suffix, base + end)?;
    Ok(spec)
}

/// Splits `s` at its leading run of ASCII digits.
fn split_digits(s: &str) -> (&str, &str) {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    s.split_at(n)
}

fn parse_ring_number(sep: char, digits: &str, after: &str) -> Result<u16, NameErrorKind> {
    let bad = || NameErrorKind::BadRingNumber {
        sep,
        text: format!(
            "{digits}{}",
            after.chars().next().map(String::from).unwrap_or_default()
        ),
    };
    if digits.is_empty() {
        return Err(bad());
    }
    match digits.parse::<u32>() {
        Ok(n) if n <= u32::from(NETMAP_RING_MASK) => Ok(n as u16),
        _ => Err(bad()),
    }
}

fn parse_suffix(spec: &mut KernelSpec, mut s: &str, mut pos: usize) -> Result<(), NameErrorKind> {
    let mut have_mode = false;
    let mut have_mem = false;
    let mut have_flags = false;
    let mut in_options = false;
    let mut first = true;
    while let Some(c) = s.chars().next() {
        let after = &s[c.len_utf8()..];
        match c {
            '^' | '*' | '-' => {
                if have_mode {
                    return Err(NameErrorKind::TwoModes);
                }
                if !first {
                    return Err(NameErrorKind::ModeNotFirst);
                }
                have_mode = true;
                let consumed = match c {
                    '*' => {
                        spec.nr_mode = NR_REG_NIC_SW;
                        1
                    }
                    '^' => {
                        let (digits, _) = split_digits(after);
                        if digits.is_empty() {
                            spec.nr_mode = NR_REG_SW;
                        } else {
                            spec.nr_mode = NR_REG_ONE_SW;
                            spec.nr_ringid = parse_ring_number('^', digits, "")?;
                        }
                        1 + digits.len()
                    }
                    _ => {
                        let (digits, tail) = split_digits(after);
                        spec.nr_mode = NR_REG_ONE_NIC;
                        spec.nr_ringid = parse_ring_number('-', digits, tail)?;
                        1 + digits.len()
                    }
                };
                s = &s[consumed..];
                pos += consumed;
            }
            '@' => {
                let (digits, _) = split_digits(after);
                if !digits.is_empty() {
                    if in_options {
                        return Err(NameErrorKind::SuffixAfterOption);
                    }
                    if have_mem {
                        return Err(NameErrorKind::TwoMemIds);
                    }
                    have_mem = true;
                    spec.nr_mem_id =
                        digits.parse::<u16>().map_err(|_| NameErrorKind::BadMemId {
                            text: digits.to_string(),
                        })?;
                    s = &s[1 + digits.len()..];
                    pos += 1 + digits.len();
                } else {
                    let len = after.find('@').unwrap_or(after.len());
                    if len == 0 {
                        return Err(NameErrorKind::EmptyOption);
                    }
                    in_options = true;
                    spec.options.push(after[..len].to_string());
                    s = &after[len..];
                    pos += 1 + len;
                }
            }
            '/' => {
                if in_options {
                    return Err(NameErrorKind::SuffixAfterOption);
                }
                if have_flags {
                    return Err(NameErrorKind::TwoFlagGroups);
                }
                have_flags = true;
                let len = after
                    .find(|c: char| !c.is_ascii_alphabetic())
                    .unwrap_or(after.len());
                if len == 0 {
                    return Err(NameErrorKind::EmptyFlags);
                }
                for flag in after[..len].chars() {
                    spec.nr_flags |= match flag {
                        'x' => NR_EXCLUSIVE,
                        'z' => NR_ZCOPY_MON,
                        't' => NR_MONITOR_TX,
                        'r' => NR_MONITOR_RX,
                        'R' => NR_RX_RINGS_ONLY,
                        'T' => NR_TX_RINGS_ONLY,
                        _ => return Err(NameErrorKind::BadFlag { flag }),
                    };
                }
                s = &after[len..];
                pos += 1 + len;
            }
            _ => {
                let place = if first {
                    "in a port name"
                } else {
                    "after a ring selector, memory id or flags (expected `@` or `/`)"
                };
                return Err(NameErrorKind::BadChar { ch: c, pos, place });
            }
        }
        first = false;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str) -> KernelSpec {
        match parse(name) {
            Ok(PortSpec::Kernel(k)) => k,
            other => panic!("{name}: expected a kernel port, got {other:?}"),
        }
    }

    fn shm(name: &str) -> ShmSpec {
        match parse(name) {
            Ok(PortSpec::Shm(s)) => s,
            other => panic!("{name}: expected a shm port, got {other:?}"),
        }
    }

    fn err(name: &str) -> NameErrorKind {
        match parse(name) {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("accepted forms"), "{msg}");
                assert!(msg.contains(&format!("{name:?}")), "{msg}");
                e.kind
            }
            Ok(spec) => panic!("{name}: expected an error, got {spec:?}"),
        }
    }

    #[test]
    fn nic_modes() {
        let k = kernel("netmap:eth0");
        assert_eq!(k.nr_name, "eth0");
        assert_eq!(k.nr_mode, NR_REG_ALL_NIC);
        assert_eq!((k.nr_ringid, k.nr_mem_id, k.nr_flags), (0, 0, 0));
        assert_eq!(
            k.kind,
            KernelPortKind::Nic {
                ifname: "eth0".into()
            }
        );
        assert_eq!(k.pipe, None);

        assert_eq!(kernel("netmap:eth0^").nr_mode, NR_REG_SW);
        let k = kernel("netmap:eth0^3");
        assert_eq!((k.nr_mode, k.nr_ringid), (NR_REG_ONE_SW, 3));
        assert_eq!(kernel("netmap:eth0*").nr_mode, NR_REG_NIC_SW);
        let k = kernel("netmap:eth0-2");
        assert_eq!(
            (k.nr_mode, k.nr_ringid, k.nr_name.as_str()),
            (NR_REG_ONE_NIC, 2, "eth0")
        );
        let k = kernel("netmap:eth0-4095");
        assert_eq!(k.nr_ringid, 4095);
        assert_eq!(kernel("netmap:eth0.100").nr_name, "eth0.100");
        assert_eq!(kernel("netmap:enp0s3_x").nr_name, "enp0s3_x");
    }

    #[test]
    fn mem_id_flags_options() {
        let k = kernel("netmap:eth0@2");
        assert_eq!((k.nr_mem_id, k.nr_mode), (2, NR_REG_ALL_NIC));
        let k = kernel("netmap:eth0-1@3/xT");
        assert_eq!(
            (k.nr_mode, k.nr_ringid, k.nr_mem_id),
            (NR_REG_ONE_NIC, 1, 3)
        );
        assert_eq!(k.nr_flags, NR_EXCLUSIVE | NR_TX_RINGS_ONLY);
        let k = kernel("netmap:eth0/xztrRT");
        assert_eq!(
            k.nr_flags,
            NR_EXCLUSIVE
                | NR_ZCOPY_MON
                | NR_MONITOR_TX
                | NR_MONITOR_RX
                | NR_RX_RINGS_ONLY
                | NR_TX_RINGS_ONLY
        );
        let k = kernel("netmap:eth0/r@4");
        assert_eq!((k.nr_flags, k.nr_mem_id), (NR_MONITOR_RX, 4));
        let k = kernel("netmap:eth0@share=port");
        assert_eq!(k.options, vec!["share=port".to_string()]);
        let k =
            kernel("netmap:eth0^@conf:rings=4,host-rings=1,slots=1024@offset:initial=64,bits=8");
        assert_eq!(k.nr_mode, NR_REG_SW);
        assert_eq!(
            k.options,
            vec![
                "conf:rings=4,host-rings=1,slots=1024".to_string(),
                "offset:initial=64,bits=8".to_string()
            ]
        );
        let k = kernel("netmap:eth0*@1/x@extmem:file=/tmp/x");
        assert_eq!(
            (k.nr_mode, k.nr_mem_id, k.nr_flags),
            (NR_REG_NIC_SW, 1, NR_EXCLUSIVE)
        );
        assert_eq!(k.options, vec!["extmem:file=/tmp/x".to_string()]);
        assert_eq!(kernel("netmap:eth0@65535").nr_mem_id, 65535);
    }

    #[test]
    fn vale_ports() {
        let k = kernel("vale0:vm1");
        assert_eq!(k.nr_name, "vale0:vm1");
        assert_eq!(k.nr_mode, NR_REG_ALL_NIC);
        assert_eq!(
            k.kind,
            KernelPortKind::Vale {
                switch: "0".into(),
                port: "vm1".into()
            }
        );
        let k = kernel("valeX:Y");
        assert_eq!(k.nr_name, "valeX:Y");
        let k = kernel("vale:p");
        assert_eq!(
            k.kind,
            KernelPortKind::Vale {
                switch: "".into(),
                port: "p".into()
            }
        );
        let k = kernel("vale1:a-3/x");
        assert_eq!(
            (k.nr_name.as_str(), k.nr_mode, k.nr_ringid),
            ("vale1:a", NR_REG_ONE_NIC, 3)
        );
        assert_eq!(k.nr_flags, NR_EXCLUSIVE);
        let k = kernel("vale0:vm1{2");
        assert_eq!(k.nr_name, "vale0:vm1{2");
        assert_eq!(k.pipe.unwrap().end, PipeEnd::A);
    }

    #[test]
    fn kernel_pipes() {
        let k = kernel("netmap:eth0{1");
        assert_eq!(k.nr_name, "eth0{1");
        assert_eq!(k.nr_mode, NR_REG_ALL_NIC);
        assert_eq!(
            k.pipe,
            Some(PipeSuffix {
                end: PipeEnd::A,
                id: "1".into()
            })
        );
        let k = kernel("netmap:eth0}1");
        assert_eq!(k.nr_name, "eth0}1");
        assert_eq!(k.pipe.as_ref().unwrap().end, PipeEnd::B);
        let k = kernel("netmap:p}abc_9@3");
        assert_eq!((k.nr_name.as_str(), k.nr_mem_id), ("p}abc_9", 3));
        assert_eq!(&k.nr_name_bytes()[..8], b"p}abc_9\0");
    }

    #[test]
    fn shm_ports() {
        let s = shm("shm:demo{0");
        assert_eq!(
            (s.name.as_str(), s.id.as_str(), s.end),
            ("demo", "0", PipeEnd::A)
        );
        assert_eq!(s.port_name(), "shm:demo{0");
        assert_eq!(s.peer_name(), "shm:demo}0");
        let s = shm("shm:Demo_2}x_Y");
        assert_eq!(
            (s.name.as_str(), s.id.as_str(), s.end),
            ("Demo_2", "x_Y", PipeEnd::B)
        );
        let long = format!("shm:{}{{0", "a".repeat(57));
        assert_eq!(long.len(), 63);
        assert_eq!(shm(&long).name.len(), 57);
    }

    #[test]
    fn length_limits() {
        let name63 = format!("netmap:{}", "e".repeat(63));
        assert_eq!(kernel(&name63).nr_name.len(), 63);
        let name64 = format!("netmap:{}", "e".repeat(64));
        assert_eq!(err(&name64), NameErrorKind::TooLong { len: 64 });
        let long = format!("shm:{}{{0", "a".repeat(58));
        assert_eq!(err(&long), NameErrorKind::TooLong { len: 64 });
        let vale = format!("vale0:{}", "p".repeat(58));
        assert_eq!(err(&vale), NameErrorKind::TooLong { len: 64 });
    }

    #[test]
    fn malformed_prefixes() {
        assert_eq!(err(""), NameErrorKind::Empty);
        assert_eq!(err("eth0"), NameErrorKind::UnknownPrefix);
        assert_eq!(err("tap:x"), NameErrorKind::UnknownPrefix);
        assert_eq!(err("Netmap:eth0"), NameErrorKind::UnknownPrefix);
        assert_eq!(err("netmap:"), NameErrorKind::MissingIfName);
        assert_eq!(err("netmap:^"), NameErrorKind::MissingIfName);
        assert_eq!(err("netmap:{1"), NameErrorKind::MissingIfName);
        assert!(matches!(
            err("netmap:eth 0"),
            NameErrorKind::BadChar {
                ch: ' ',
                pos: 10,
                ..
            }
        ));
        assert!(matches!(
            err("netmap:et:h0"),
            NameErrorKind::BadChar { ch: ':', .. }
        ));
    }

    #[test]
    fn malformed_vale() {
        assert_eq!(err("vale0"), NameErrorKind::ValeMissingPort);
        assert_eq!(err("vale0:"), NameErrorKind::ValeEmptyPort);
        assert_eq!(err("vale0:^"), NameErrorKind::ValeEmptyPort);
        assert!(matches!(
            err("vale0:a:b"),
            NameErrorKind::BadChar { ch: ':', .. }
        ));
        assert!(matches!(
            err("vale.x:a"),
            NameErrorKind::BadChar {
                ch: '.',
                pos: 4,
                ..
            }
        ));
        assert!(matches!(
            err("vale0:a.b"),
            NameErrorKind::BadChar { ch: '.', .. }
        ));
    }

    #[test]
    fn malformed_pipes() {
        assert_eq!(err("netmap:eth0{"), NameErrorKind::EmptyPipeId { sep: '{' });
        assert_eq!(err("netmap:eth0}"), NameErrorKind::EmptyPipeId { sep: '}' });
        assert_eq!(err("netmap:eth0{1}2"), NameErrorKind::TwoPipeSeparators);
        assert!(matches!(
            err("netmap:eth0{a.b"),
            NameErrorKind::BadChar { ch: '.', .. }
        ));
    }

    #[test]
    fn malformed_suffixes() {
        assert!(matches!(
            err("netmap:eth0-"),
            NameErrorKind::BadRingNumber { sep: '-', .. }
        ));
        assert!(matches!(
            err("netmap:eth0-x"),
            NameErrorKind::BadRingNumber { sep: '-', .. }
        ));
        assert!(matches!(
            err("netmap:eth0-4096"),
            NameErrorKind::BadRingNumber { .. }
        ));
        assert!(matches!(
            err("netmap:eth0^99999999999"),
            NameErrorKind::BadRingNumber { sep: '^', .. }
        ));
        assert_eq!(err("netmap:eth0^1*"), NameErrorKind::TwoModes);
        assert_eq!(err("netmap:eth0**"), NameErrorKind::TwoModes);
        assert_eq!(err("netmap:eth0@1-2"), NameErrorKind::ModeNotFirst);
        assert_eq!(err("netmap:eth0/x*"), NameErrorKind::ModeNotFirst);
        assert!(matches!(
            err("netmap:eth0^x"),
            NameErrorKind::BadChar { ch: 'x', .. }
        ));
        assert!(matches!(
            err("netmap:eth0@65536"),
            NameErrorKind::BadMemId { .. }
        ));
        assert_eq!(err("netmap:eth0@1@2"), NameErrorKind::TwoMemIds);
        assert_eq!(err("netmap:eth0/q"), NameErrorKind::BadFlag { flag: 'q' });
        assert_eq!(err("netmap:eth0/"), NameErrorKind::EmptyFlags);
        assert_eq!(err("netmap:eth0/x/z"), NameErrorKind::TwoFlagGroups);
        assert_eq!(err("netmap:eth0@"), NameErrorKind::EmptyOption);
        assert_eq!(err("netmap:eth0@a@@b"), NameErrorKind::EmptyOption);
        assert_eq!(err("netmap:eth0@opt@3"), NameErrorKind::SuffixAfterOption);
        assert_eq!(
            kernel("netmap:eth0@opt/x").options,
            vec!["opt/x".to_string()]
        );
        assert!(matches!(
            err("netmap:eth0-1\u{e9}"),
            NameErrorKind::BadChar { .. }
        ));
        assert!(matches!(
            err("netmap:eth0/x\u{e9}"),
            NameErrorKind::BadChar { .. }
        ));
    }

    #[test]
    fn malformed_shm() {
        assert_eq!(err("shm:"), NameErrorKind::ShmMissingEnd);
        assert_eq!(err("shm:demo"), NameErrorKind::ShmMissingEnd);
        assert_eq!(err("shm:{0"), NameErrorKind::ShmEmptyName);
        assert_eq!(err("shm:}0"), NameErrorKind::ShmEmptyName);
        assert_eq!(err("shm:demo{"), NameErrorKind::EmptyPipeId { sep: '{' });
        assert_eq!(err("shm:demo}"), NameErrorKind::EmptyPipeId { sep: '}' });
        assert_eq!(err("shm:a{b{c"), NameErrorKind::TwoPipeSeparators);
        assert_eq!(err("shm:a{b}c"), NameErrorKind::TwoPipeSeparators);
        assert_eq!(err("shm:demo{0^"), NameErrorKind::ShmSuffix);
        assert_eq!(err("shm:demo{0@1"), NameErrorKind::ShmSuffix);
        assert_eq!(err("shm:demo{0/x"), NameErrorKind::ShmSuffix);
        assert!(matches!(
            err("shm:de-mo{0"),
            NameErrorKind::BadChar {
                ch: '-',
                pos: 6,
                ..
            }
        ));
        assert!(matches!(
            err("shm:de.mo{0"),
            NameErrorKind::BadChar { ch: '.', .. }
        ));
        assert!(matches!(
            err("shm:demo{0.1"),
            NameErrorKind::BadChar {
                ch: '.',
                pos: 10,
                ..
            }
        ));
        assert!(matches!(
            err("shm:dé{0"),
            NameErrorKind::BadChar { ch: 'é', .. }
        ));
        assert!(matches!(err("shm:demo"), NameErrorKind::ShmMissingEnd));
    }

    #[test]
    fn error_message_names_the_problem() {
        let e = parse("shm:demo").unwrap_err().to_string();
        assert!(e.contains("shm:NAME{ID"), "{e}");
        assert!(e.contains("missing"), "{e}");
        let e = parse("netmap:eth0/q").unwrap_err().to_string();
        assert!(e.contains("unknown flag 'q'"), "{e}");
    }
}
