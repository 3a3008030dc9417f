//! TCP RST segments, built by hand for the kill path that does not rely on
//! SOCK_DESTROY: the RST each end of a connection will accept.
//!
//! Since RFC 5961 a receiver accepts a RST only if its sequence number is
//! exactly RCV.NXT; anything else in the window only draws a challenge ACK.
//! So the sequence numbers come from the kernel's own accounting (see
//! `next_sequences`), never from a guess.
//!
//! Pure functions: no I/O, unit-tested.

#![forbid(unsafe_code)]

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

/// The Ethernet frame carrying the RST, for a link the daemon writes to
/// directly (a forwarded flow has no local route to lean on).
pub fn ethernet_frame(dst_mac: [u8; 6], src_mac: [u8; 6], rst: &Rst) -> Vec<u8> {
    let ethertype: u16 = if rst.src.is_ipv4() { 0x0800 } else { 0x86dd };
    let mut out = Vec::with_capacity(14 + 60);
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(&ip_packet(rst));
    out
}

/// The RSTs that end a forwarded flow: to each end it has been seen from,
/// from the other end, with that end's RCV.NXT. The other end's SND.NXT is
/// it when everything in flight arrived; the end's own last ACK when not
/// (or when the other end was never seen): both are sent when they differ,
/// one of them is exact. Returns (end index, segment) pairs.
pub fn forwarded_resets(
    key: &reaper_common::FlowTuple,
    flow: &reaper_common::Forwarded,
) -> Vec<(usize, Rst)> {
    let (a, b) = crate::tuple::addrs_of(key);
    let addr = [a, b];
    let mut out = Vec::new();
    for to in 0..2 {
        let from = 1 - to;
        let (end, other) = (&flow.ends[to], &flow.ends[from]);
        if end.seen == 0 {
            continue;
        }
        let mut seqs = Vec::with_capacity(2);
        if other.seen != 0 {
            seqs.push(other.next_seq);
        }
        if !seqs.contains(&end.ack) {
            seqs.push(end.ack);
        }
        for seq in seqs {
            out.push((
                to,
                Rst {
                    src: addr[from],
                    dst: addr[to],
                    seq,
                },
            ));
        }
    }
    out
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
    fn frames_carry_macs_and_ethertype() {
        let rst = Rst {
            src: "[fd00::1]:1".parse().unwrap(),
            dst: "[fd00::2]:2".parse().unwrap(),
            seq: 1,
        };
        let f = ethernet_frame([1; 6], [2; 6], &rst);
        assert_eq!(&f[0..6], &[1; 6]);
        assert_eq!(&f[6..12], &[2; 6]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f.len(), 14 + 60);
    }

    #[test]
    fn forwarded_resets_use_the_other_ends_sequence() {
        use reaper_common::{forwarded_key, Forwarded, ForwardedEnd, AF_INET};
        let a = [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0];
        let b = [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0];
        let (key, _) = forwarded_key(AF_INET, a, 40000, b, 5900);
        let end = |next_seq, ack| ForwardedEnd {
            next_seq,
            ack,
            seen: 1,
            ..Default::default()
        };
        // Everything acknowledged: one exact RST each way.
        let flow = Forwarded {
            ends: [end(100, 500), end(500, 100)],
            ..Default::default()
        };
        let resets = forwarded_resets(&key, &flow);
        assert_eq!(resets.len(), 2);
        assert_eq!(resets[0].1.seq, 500, "to a: b's SND.NXT");
        assert_eq!(resets[0].1.dst.port(), 40000);
        assert_eq!(resets[1].1.seq, 100, "to b: a's SND.NXT");
        // b has data in flight that a has not acknowledged: both candidates.
        let flow = Forwarded {
            ends: [end(100, 450), end(500, 100)],
            ..Default::default()
        };
        let to_a: Vec<u32> = forwarded_resets(&key, &flow)
            .iter()
            .filter(|(to, _)| *to == 0)
            .map(|(_, r)| r.seq)
            .collect();
        assert_eq!(to_a, vec![500, 450]);
        // b never seen: only a gets a RST, from its own last ACK.
        let flow = Forwarded {
            ends: [end(100, 77), ForwardedEnd::default()],
            ..Default::default()
        };
        let resets = forwarded_resets(&key, &flow);
        assert_eq!(resets.len(), 1);
        assert_eq!((resets[0].0, resets[0].1.seq), (0, 77));
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
