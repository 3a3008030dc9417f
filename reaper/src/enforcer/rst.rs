//! TCP RST segments, built by hand for the kill path that does not rely on
//! SOCK_DESTROY: the RST each end of a connection will accept.
//!
//! Since RFC 5961 a receiver accepts a RST only if its sequence number is
//! exactly RCV.NXT; anything else in the window only draws a challenge ACK.
//! So the sequence numbers come from the kernel's own accounting (see
//! `next_sequences`), never from a guess.
//!
//! Pure functions: no I/O, unit-tested.

use std::net::{IpAddr, SocketAddr};

use reaper_common::Flow;

/// TCP states (as sock_diag reports them) in which the peer's FIN has been
/// received, so RCV.NXT counts it.
const FIN_RECEIVED: [u8; 4] = [
    8,  /* CLOSE_WAIT */
    9,  /* LAST_ACK */
    11, /* CLOSING */
    6,  /* TIME_WAIT */
];
/// States in which our FIN has been sent, so SND.NXT counts it.
const FIN_SENT: [u8; 4] = [
    4,  /* FIN_WAIT1 */
    5,  /* FIN_WAIT2 */
    11, /* CLOSING */
    9,  /* LAST_ACK */
];

/// A local socket's byte counters (from tcp_info) and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub state: u8,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
    pub bytes_acked: u64,
}

/// The local socket's RCV.NXT, SND.NXT and SND.UNA, from the sequence
/// numbers recorded at establishment and tcp_info's counters (which count
/// payload only; a FIN takes one more).
pub fn next_sequences(flow: &Flow, c: &Counters) -> (u32, u32, u32) {
    let fin_in = FIN_RECEIVED.contains(&c.state) as u32;
    let fin_out = FIN_SENT.contains(&c.state) as u32;
    let rcv_nxt = flow
        .rcv_isn1
        .wrapping_add(c.bytes_received as u32)
        .wrapping_add(fin_in);
    let snd_nxt = flow
        .snd_isn1
        .wrapping_add(c.bytes_sent.wrapping_sub(c.bytes_retrans) as u32)
        .wrapping_add(fin_out);
    let snd_una = flow.snd_isn1.wrapping_add(c.bytes_acked as u32);
    (rcv_nxt, snd_nxt, snd_una)
}

/// One RST segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rst {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], 0])
        };
        acc += word as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The 20-byte TCP header of a RST, its checksum computed over the given
/// pseudo-header sum.
fn tcp_header(rst: &Rst, pseudo: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&rst.src.port().to_be_bytes());
    h[2..4].copy_from_slice(&rst.dst.port().to_be_bytes());
    h[4..8].copy_from_slice(&rst.seq.to_be_bytes());
    h[12] = 5 << 4; // data offset: 5 words
    h[13] = 0x04; // RST
    let sum = fold(sum16(&h, pseudo));
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    h
}

/// The IP packet (v4 or v6, as the addresses are) carrying the RST.
pub fn ip_packet(rst: &Rst) -> Vec<u8> {
    match (rst.src.ip(), rst.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64; // TTL
            ip[9] = 6; // TCP
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let sum = fold(sum16(&ip, 0));
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let pseudo = sum16(&s.octets(), sum16(&d.octets(), 6 + 20));
            let mut out = ip.to_vec();
            out.extend_from_slice(&tcp_header(rst, pseudo));
            out
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6; // next header: TCP
            ip[7] = 64; // hop limit
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let pseudo = sum16(&s.octets(), sum16(&d.octets(), 20 + 6));
            let mut out = ip.to_vec();
            out.extend_from_slice(&tcp_header(rst, pseudo));
            out
        }
        _ => panic!("a RST's addresses are of one family"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verifies a checksum the way a receiver does: the sum over the data
    /// (checksum included) folds to zero.
    fn verifies(data: &[u8], pseudo: u32) -> bool {
        fold(sum16(data, pseudo)) == 0
    }

    #[test]
    fn ipv4_rst_has_valid_checksums() {
        let rst = Rst {
            src: "10.1.2.3:5900".parse().unwrap(),
            dst: "10.9.8.7:40312".parse().unwrap(),
            seq: 0xdead_beef,
        };
        let p = ip_packet(&rst);
        assert_eq!(p.len(), 40);
        assert!(verifies(&p[..20], 0), "IPv4 header checksum");
        let pseudo = sum16(&[10, 1, 2, 3], sum16(&[10, 9, 8, 7], 6 + 20));
        assert!(verifies(&p[20..], pseudo), "TCP checksum");
        assert_eq!(&p[24..28], &0xdead_beefu32.to_be_bytes());
        assert_eq!(p[33], 0x04, "RST only");
        assert_eq!(&p[20..22], &5900u16.to_be_bytes());
        // A known-good header: the same fields checked by hand.
        assert_eq!(
            &p[10..12],
            &[0x1c, 0xbd],
            "hand-computed IPv4 header checksum"
        );
    }

    #[test]
    fn ipv6_rst_has_valid_checksum() {
        let rst = Rst {
            src: "[fd00::1]:5900".parse().unwrap(),
            dst: "[fd00::2]:40000".parse().unwrap(),
            seq: 7,
        };
        let p = ip_packet(&rst);
        assert_eq!(p.len(), 60);
        assert_eq!(p[0] >> 4, 6);
        let s: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        let d: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
        assert!(verifies(
            &p[40..],
            sum16(&s.octets(), sum16(&d.octets(), 26))
        ));
    }

    #[test]
    fn sequences_follow_the_byte_counters() {
        let flow = Flow {
            snd_isn1: 1000,
            rcv_isn1: u32::MAX - 1,
            ..Default::default()
        };
        let c = Counters {
            state: 1, // ESTABLISHED
            bytes_received: 10,
            bytes_sent: 600,
            bytes_retrans: 100,
            bytes_acked: 450,
        };
        assert_eq!(
            next_sequences(&flow, &c),
            (8, 1500, 1450),
            "wraps around 2^32"
        );
        let closing = Counters { state: 8, ..c }; // CLOSE_WAIT: the peer's FIN is in
        assert_eq!(next_sequences(&flow, &closing).0, 9);
        let fin_wait = Counters { state: 4, ..c }; // FIN_WAIT1: our FIN is out
        assert_eq!(next_sequences(&flow, &fin_wait).1, 1501);
    }
}
