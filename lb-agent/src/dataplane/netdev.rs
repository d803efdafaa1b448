//! Facts about a network device of the calling thread's network namespace, asked of the kernel.

use anyhow::{Context, Result, bail};

/// The device's interface index; an error names the device when it is not in this namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("device name with a NUL byte")?;
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("no device {name} in this network namespace");
    }
    Ok(ifindex)
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with the data pointer member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut DrvInfo,
    _rest: [u8; 16],
}

/// The device's driver as `ethtool -i` names it ("veth", "mlx5_core", "virtio_net", ...).
pub fn driver(name: &str) -> Result<String> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("device name {name} is too long");
    }
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _rest: [0; 16] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a datagram socket only serves as the handle for the ioctl; closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for the ethtool ioctl");
    }
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO fills the drvinfo `req` points to, which lives
    // until the call returns.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    if rc < 0 {
        return Err(err).with_context(|| format!("asking the driver of {name} (ethtool)"));
    }
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_index_and_a_missing_device_is_named() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        let e = ifindex("no-such-dev0").unwrap_err().to_string();
        assert!(e.contains("no-such-dev0"), "{e}");
        assert!(driver("no-such-dev0").is_err());
        assert!(driver("a-name-longer-than-ifnamsiz").is_err());
    }
}
