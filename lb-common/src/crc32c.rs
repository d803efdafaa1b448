//! SCTP's checksum (CRC32c, RFC 9260 appendix B) kept right when a translation changes an
//! SCTP packet's ports, without reading the rest of the packet: the datapath (`lb-ebpf`'s
//! `sctp.rs`) and the tests share this arithmetic.
//!
//! A CRC is linear over GF(2): for two messages of one length, the XOR of their CRCs is the
//! CRC, without initial value or final XOR, of the XOR of the messages. Ports are an SCTP
//! packet's first four bytes, so that XOR is the ports' change `d` followed by `len - 4` zero
//! bytes, whose CRC is `d(x) * x^(8 len) mod P` (`d` read as the CRC register reads bytes:
//! a little-endian word, in the reflected bit order where bit 31 is `x^0`). SCTP carries its
//! checksum as the CRC's little-endian bytes: the packet's field, read as a little-endian
//! word, changes by XOR with [`port_change`]. The checksum does not cover addresses (SCTP has
//! no pseudo-header).

/// The Castagnoli polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;
/// `x^0` in the reflected representation.
const ONE: u32 = 0x8000_0000;

/// `a * b mod P`, both reflected. Branch-free: the same 32 steps for every input (a bounded
/// loop the verifier walks once per step).
#[inline(always)]
pub const fn mul(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    let mut i = 0;
    while i < 32 {
        p ^= b & 0u32.wrapping_sub((a >> (31 - i)) & 1);
        b = times_x(b);
        i += 1;
    }
    p
}

/// `b * x mod P`.
#[inline(always)]
const fn times_x(b: u32) -> u32 {
    (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1))
}

/// `x^(8 n) mod P` for each `n` below 65,536 (an IPv4 or IPv6 payload's length): 256 KiB,
/// in the kernel programs' read-only data, so that a length costs one read (where squaring
/// would cost a multiplication per bit of the length).
pub static SHIFT_BY_LEN: [u32; 65_536] = shift_by_len();

const fn shift_by_len() -> [u32; 65_536] {
    let mut t = [0; 65_536];
    t[0] = ONE;
    let mut n = 1;
    while n < t.len() {
        let mut v = t[n - 1];
        let mut bit = 0;
        while bit < 8 {
            v = times_x(v);
            bit += 1;
        }
        t[n] = v;
        n += 1;
    }
    t
}

/// What an SCTP packet of `len` bytes (its common header and chunks: the IP payload) XORs
/// into its checksum, read as a little-endian word, when its ports change from `old` to `new`
/// (each the header's first four bytes read as a little-endian word).
///
/// One multiplication, 32 steps whatever changed: a branch skipping the source port's half when
/// only the destination port changes (a DNAT: 16 steps) made the verifier walk everything after
/// each rewrite twice, past its limit.
#[inline(always)]
pub fn port_change(old: u32, new: u32, len: u32) -> u32 {
    // A length is below 65,536 (the mask bounds the index for the verifier and drops the
    // bounds check).
    mul(old ^ new, SHIFT_BY_LEN[(len & 0xffff) as usize])
}

/// The CRC32c of `data`, bit by bit as RFC 9260 appendix B defines it (for tools and tests,
/// which build and check whole packets; nothing here shares its arithmetic). SCTP stores it
/// as little-endian bytes, computed with the checksum field zeroed.
pub fn checksum(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    let mut i = 0;
    while i < data.len() {
        crc ^= data[i] as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        i += 1;
    }
    !crc
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::{checksum as crc32c, *};

    /// An SCTP packet of `len` bytes, its checksum filled in.
    fn packet(len: usize, seed: u32) -> Vec<u8> {
        let mut p = vec![0u8; len];
        let mut x = seed | 1;
        for b in p.iter_mut().take(len) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        p[8..12].fill(0);
        let crc = crc32c(&p[..len]);
        p[8..12].copy_from_slice(&crc.to_le_bytes());
        p
    }

    #[test]
    fn the_rfc_check_value() {
        // RFC 9260 / iSCSI's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn the_length_table_holds_x_to_the_8n() {
        // Bit by bit for a few lengths, by squaring (another way) for every one.
        for n in [0usize, 1, 2, 255, 256, 257, 1500, 9000, 65_535] {
            let mut x = ONE;
            for _ in 0..8 * n {
                x = mul(x, ONE >> 1);
            }
            assert_eq!(SHIFT_BY_LEN[n], x, "n = {n}");
        }
        for (n, &entry) in SHIFT_BY_LEN.iter().enumerate() {
            let (mut power, mut base, mut e) = (ONE, ONE >> 8, n);
            while e > 0 {
                if e & 1 == 1 {
                    power = mul(power, base);
                }
                base = mul(base, base);
                e >>= 1;
            }
            assert_eq!(entry, power, "n = {n}");
        }
    }

    #[test]
    fn a_port_change_keeps_the_checksum_right_at_every_length() {
        for (i, len) in
            [12usize, 13, 16, 20, 28, 64, 255, 256, 257, 1000, 1452, 2048, 9000, 65_495, 65_515]
                .into_iter()
                .enumerate()
        {
            for (old_ports, new_ports) in [
                // The destination port alone (a DNAT), the source port alone (a SNAT's
                // reply leg), both.
                ([0x9c, 0x40, 0x75, 0x60], [0x9c, 0x40, 0x1f, 0x90]),
                ([0x9c, 0x40, 0x75, 0x60], [0x80, 0x01, 0x75, 0x60]),
                ([0x12, 0x34, 0x56, 0x78], [0xee, 0xf5, 0x1f, 0x90]),
                ([0xff, 0xff, 0xff, 0xff], [0, 0, 0, 0]),
            ] {
                let mut p = packet(len, 7 + i as u32);
                p[..4].copy_from_slice(&old_ports);
                p[8..12].fill(0);
                let crc = crc32c(&p[..len]);
                p[8..12].copy_from_slice(&crc.to_le_bytes());

                let delta = port_change(
                    u32::from_le_bytes(old_ports),
                    u32::from_le_bytes(new_ports),
                    len as u32,
                );
                p[..4].copy_from_slice(&new_ports);
                let field = u32::from_le_bytes(p[8..12].try_into().unwrap()) ^ delta;
                p[8..12].fill(0);
                assert_eq!(field, crc32c(&p[..len]), "length {len}, ports {new_ports:?}");
            }
        }
    }

    #[test]
    fn no_port_change_changes_nothing() {
        assert_eq!(port_change(0x1234_5678, 0x1234_5678, 1500), 0);
    }
}
