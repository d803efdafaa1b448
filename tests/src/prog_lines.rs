//! Where a loaded program's time goes (`lb-bench profile`): `perf` samples every CPU, with call
//! chains, while the program runs. A sample taken inside the program's JIT image is put down
//! to its function and the source line of the instruction it hit, through the line info the
//! kernel keeps with the program (the object carries BTF for it, `lb-agent/build.rs`); one
//! taken in a kernel function whose call chain passes through the program (a map lookup, a
//! checksum helper) to that function.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The leading members of `struct bpf_prog_info` (uapi `linux/bpf.h`), as far as this reads,
/// and one more: no padding, whose bytes the kernel would read as counts.
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    kind: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
    ifindex: u32,
    gpl_compatible: u32,
    netns_dev: u64,
    netns_ino: u64,
    nr_jited_ksyms: u32,
    nr_jited_func_lens: u32,
    jited_ksyms: u64,
    jited_func_lens: u64,
    btf_id: u32,
    func_info_rec_size: u32,
    func_info: u64,
    nr_func_info: u32,
    nr_line_info: u32,
    line_info: u64,
    jited_line_info: u64,
    nr_jited_line_info: u32,
    line_info_rec_size: u32,
    jited_line_info_rec_size: u32,
    nr_prog_tags: u32,
}

/// `struct bpf_line_info`: an instruction's source file, line text and line/column, the
/// first two as offsets into the program's BTF strings.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LineInfo {
    insn_off: u32,
    file_name_off: u32,
    line_off: u32,
    line_col: u32,
}

use lb_agent::dataplane::sys_bpf::{BPF_OBJ_GET_INFO_BY_FD, bpf};

const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

/// BPF_OBJ_GET_INFO_BY_FD of object `fd` into `info` (`#[repr(C)]`, no padding), whose
/// pointers, if any, point at buffers of the sizes it gives for the kernel to fill.
fn object_info<T>(fd: i32, info: &mut T) -> Result<()> {
    #[repr(C)]
    struct Attr {
        fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr =
        Attr { fd: fd as u32, info_len: size_of::<T>() as u32, info: info as *mut T as u64 };
    // SAFETY: an obj_get_info_by_fd attribute, no byte unset, pointing at `info` (see above).
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

/// The string section of BTF object `id`.
fn btf_strings(id: u32) -> Result<Vec<u8>> {
    // The get_fd_by_id member of `union bpf_attr`: id, next_id, open_flags.
    let mut attr = [id, 0, 0];
    // SAFETY: a get_fd_by_id attribute, no byte unset.
    let fd = unsafe { bpf(BPF_BTF_GET_FD_BY_ID, &mut attr) }.context("BPF_BTF_GET_FD_BY_ID")?;
    // SAFETY: the kernel returned a new descriptor, owned from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    #[repr(C)]
    #[derive(Default)]
    struct BtfInfo {
        btf: u64,
        btf_size: u32,
        id: u32,
        name: u64,
        name_len: u32,
        kernel_btf: u32,
    }
    let mut info = BtfInfo::default();
    object_info(fd.as_raw_fd(), &mut info)?;
    let mut raw = vec![0u8; info.btf_size as usize];
    let mut info = BtfInfo { btf: raw.as_mut_ptr() as u64, btf_size: raw.len() as u32, ..info };
    object_info(fd.as_raw_fd(), &mut info)?;
    // struct btf_header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len.
    let word = |at: usize| raw.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let (Some(hdr_len), Some(str_off), Some(str_len)) = (word(4), word(16), word(20)) else {
        bail!("BTF {id}: a header too short");
    };
    let start = (hdr_len + str_off) as usize;
    raw.get(start..start + str_len as usize)
        .map(<[u8]>::to_vec)
        .with_context(|| format!("BTF {id}: strings out of bounds"))
}

/// The program's JIT images and, in address order, where each source line's code starts.
pub struct LineMap {
    /// Each function's image: start address, length and name.
    funcs: Vec<(u64, u64, String)>,
    /// (first address, index into `labels`).
    starts: Vec<(u64, usize)>,
    /// "file:line  source text".
    labels: Vec<String>,
    /// The kernel's, for the functions the program calls.
    symbols: KernelSymbols,
}

impl LineMap {
    /// Reads the JIT line info of the loaded program `fd`.
    pub fn of(fd: BorrowedFd) -> Result<Self> {
        let fd = fd.as_raw_fd();
        let mut counts = ProgInfo::default();
        object_info(fd, &mut counts)?;
        if counts.btf_id == 0 || counts.nr_jited_line_info == 0 {
            bail!("the program carries no line info (an object built without BTF)");
        }
        let mut ksyms = vec![0u64; counts.nr_jited_ksyms as usize];
        let mut lens = vec![0u32; counts.nr_jited_func_lens as usize];
        let mut lines = vec![LineInfo::default(); counts.nr_line_info as usize];
        let mut jited = vec![0u64; counts.nr_jited_line_info as usize];
        let mut info = ProgInfo {
            nr_jited_ksyms: ksyms.len() as u32,
            nr_jited_func_lens: lens.len() as u32,
            jited_ksyms: ksyms.as_mut_ptr() as u64,
            jited_func_lens: lens.as_mut_ptr() as u64,
            nr_line_info: lines.len() as u32,
            line_info: lines.as_mut_ptr() as u64,
            line_info_rec_size: size_of::<LineInfo>() as u32,
            jited_line_info: jited.as_mut_ptr() as u64,
            nr_jited_line_info: jited.len() as u32,
            jited_line_info_rec_size: size_of::<u64>() as u32,
            ..Default::default()
        };
        object_info(fd, &mut info)?;
        let strings = btf_strings(counts.btf_id)?;
        let text = |off: u32| {
            let s = strings.get(off as usize..).unwrap_or_default();
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let mut labels: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut starts = Vec::with_capacity(jited.len());
        for (&addr, line) in jited.iter().zip(&lines) {
            let file = text(line.file_name_off);
            let file = file.rsplit('/').next().unwrap_or_default();
            let label = format!("{file}:{}  {}", line.line_col >> 10, text(line.line_off).trim());
            let next = labels.len();
            let i = *index.entry(label.clone()).or_insert(next);
            if i == next {
                labels.push(label);
            }
            starts.push((addr, i));
        }
        starts.sort_unstable();
        let symbols = KernelSymbols::read();
        let funcs = ksyms
            .iter()
            .zip(lens)
            .map(|(&start, len)| {
                let name = symbols.function(start).unwrap_or_else(|| format!("{start:#x}"));
                (start, u64::from(len), name)
            })
            .collect();
        Ok(Self { funcs, starts, labels, symbols })
    }

    /// Each function's name and where its image starts.
    pub fn functions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.funcs.iter().map(|(start, _, name)| (name.as_str(), *start))
    }

    /// The source line ("file:line  text") of the code at `ip`, if `ip` is in the program.
    pub fn line(&self, ip: u64) -> Option<&str> {
        self.line_at(ip).map(|(_, line)| self.labels[line].as_str())
    }

    /// The function and the source line whose code holds `ip`, if `ip` is in the program.
    fn line_at(&self, ip: u64) -> Option<(usize, usize)> {
        let func =
            self.funcs.iter().position(|(start, len, _)| (*start..start + len).contains(&ip))?;
        let after = self.starts.partition_point(|&(addr, _)| addr <= ip);
        after.checked_sub(1).map(|i| (func, self.starts[i].1))
    }
}

/// The kernel's symbols (`/proc/kallsyms`), by address.
pub struct KernelSymbols(Vec<(u64, String)>);

impl KernelSymbols {
    pub fn read() -> Self {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let mut symbols: Vec<(u64, String)> = kallsyms
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let name = parts.nth(1)?;
                Some((addr, name.to_owned()))
            })
            .filter(|(addr, _)| *addr != 0)
            .collect();
        symbols.sort_unstable();
        Self(symbols)
    }

    /// The symbol whose code holds `ip` (the last one starting at or before it).
    fn at(&self, ip: u64) -> Option<&str> {
        let after = self.0.partition_point(|(addr, _)| *addr <= ip);
        after.checked_sub(1).map(|i| self.0[i].1.as_str())
    }

    /// The name of the JIT function starting at `addr` (`bpf_prog_<tag>_<function>`, the
    /// function's name escaped), as the source names it.
    fn function(&self, addr: u64) -> Option<String> {
        let i = self.0.partition_point(|(a, _)| *a < addr);
        let (a, name) = self.0.get(i)?;
        // bpf_prog_, 16 hex digits of tag, _.
        (*a == addr).then(|| unescape(name.get(26..).unwrap_or(name)))
    }
}

/// Undoes the JIT's escapes in a symbol name: `_3C_` for `<`, any byte as `_XX_`.
fn unescape(name: &str) -> String {
    let mut out = String::new();
    let mut rest = name;
    while let Some(at) = rest.find('_') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4).filter(|c| c.ends_with('_'));
        match code.and_then(|c| u8::from_str_radix(&c[..2], 16).ok()) {
            Some(byte) if byte.is_ascii_punctuation() => {
                out.push(byte as char);
                rest = &rest[at + 4..];
            }
            _ => {
                out.push('_');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `perf record` of every CPU, running until [`Recording::finish`].
pub struct Recording {
    perf: Child,
    data: std::path::PathBuf,
}

impl Recording {
    /// Starts recording into `data`; `Err` says why it could not (no `perf`, say).
    pub fn start(data: &Path) -> Result<Self> {
        let perf = Command::new("perf")
            .args(["record", "-a", "-g", "-q", "-o"])
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run perf (Debian: the linux-perf package)")?;
        // perf opens its events before the first sample can land: give it the time to.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(Self { perf, data: data.to_owned() })
    }

    /// Stops recording (SIGINT, as ^C would) and returns the samples' call chains, innermost
    /// address first.
    pub fn finish(mut self) -> Result<Vec<Vec<u64>>> {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        let status = self.perf.wait()?;
        // perf writes its data, then dies of the signal it caught.
        use std::os::unix::process::ExitStatusExt;
        if !status.success() && status.signal() != Some(libc::SIGINT) {
            bail!("perf record failed ({status})");
        }
        let out = Command::new("perf")
            .args(["script", "-F", "ip", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("running perf script")?;
        // One address a line, a blank line after each sample's chain.
        let text = String::from_utf8_lossy(&out.stdout);
        let chains = text
            .split("\n\n")
            .map(|sample| {
                let words = sample.split_whitespace();
                words.filter_map(|t| u64::from_str_radix(t, 16).ok()).collect::<Vec<u64>>()
            })
            .filter(|chain| !chain.is_empty())
            .collect();
        Ok(chains)
    }
}

/// Whatever happened, perf stops and its data goes.
impl Drop for Recording {
    fn drop(&mut self) {
        let _ = self.perf.kill();
        let _ = self.perf.wait();
        let _ = std::fs::remove_file(&self.data);
    }
}

/// Where the program's samples went: those whose call chain passes through it, in its own
/// code or in a kernel function it called. Percentages are of all of them, most first.
pub struct Shares {
    /// Samples in the program or in what it called.
    pub total: usize,
    /// Percent in its own code, by function.
    pub functions: Vec<(f64, String)>,
    /// Percent in the kernel functions it called (the sampled one, the innermost).
    pub callees: Vec<(f64, String)>,
    /// Percent in its own code, by function and source line.
    pub lines: Vec<(f64, String)>,
}

/// [`Shares`] of sampled call `chains` (innermost address first).
pub fn shares(map: &LineMap, chains: &[Vec<u64>]) -> Shares {
    let mut functions: HashMap<String, usize> = HashMap::new();
    let mut callees: HashMap<String, usize> = HashMap::new();
    let mut lines: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for chain in chains {
        let Some(&leaf) = chain.first() else { continue };
        if let Some((func, line)) = map.line_at(leaf) {
            let func = &map.funcs[func].2;
            *functions.entry(func.clone()).or_default() += 1;
            *lines.entry(format!("{func}: {}", map.labels[line])).or_default() += 1;
        } else if chain.iter().any(|&ip| map.line_at(ip).is_some()) {
            let callee = map.symbols.at(leaf).unwrap_or("?");
            *callees.entry(callee.to_owned()).or_default() += 1;
        } else {
            continue;
        }
        total += 1;
    }
    let ranked = |counts: HashMap<String, usize>| {
        let mut rows: Vec<(f64, String)> =
            counts.into_iter().map(|(what, n)| (100.0 * n as f64 / total as f64, what)).collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        rows
    };
    Shares { total, functions: ranked(functions), callees: ranked(callees), lines: ranked(lines) }
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn jit_symbol_names_read_as_the_source_names_them() {
        assert_eq!(
            unescape("tracked_3C_lb_3A__3A_rewrite_3A__3A_Tc_3E_"),
            "tracked<lb::rewrite::Tc>"
        );
        assert_eq!(unescape("tc_ingress"), "tc_ingress");
        // Underscores that are no escape stay; so do escapes of letters (no name has them).
        assert_eq!(unescape("new_flow_4A_x_"), "new_flow_4A_x_");
        assert_eq!(unescape("a_"), "a_");
    }
}
