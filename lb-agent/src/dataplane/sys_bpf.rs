//! The bpf(2) system call, for the commands aya 0.14 does not wrap (object get by path, link
//! update, link info, batch lookups).

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
pub const BPF_OBJ_PIN: libc::c_long = 6;
pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_LINK_UPDATE: libc::c_long = 29;

/// Calls bpf(`cmd`, `attr`): the call's non-negative result, or the error it set.
///
/// # Safety
/// `attr` is the `union bpf_attr` member `cmd` reads, `#[repr(C)]` with every byte past its
/// fields zero (the kernel refuses set unused bytes), and every pointer in it is valid for what
/// the kernel reads or writes there.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<i64> {
    // SAFETY: as the caller promises.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>() as u32) };
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret) }
}
