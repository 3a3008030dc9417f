//! Kill mechanics: destroying local sockets through sock_diag (in each
//! socket's own network namespace), exact RSTs where SOCK_DESTROY is not
//! available, and RSTs out of the interface for forwarded flows.

use std::collections::BTreeMap;

use reaper_common::{Flow, FlowTuple, Forwarded};
use tracing::warn;

use super::diag::Sampled;
use super::{netns, rst, sys, Enforcer};
use crate::kernel::{DestroyOutcome, SocketRef};
use crate::tuple;

/// TCP_CLOSE as sock_diag reports states.
const TCP_CLOSE: u8 = 7;

impl Enforcer {
    pub(super) fn destroy_sockets(&mut self, targets: &[SocketRef]) -> Vec<DestroyOutcome> {
        self.per_namespace(
            targets,
            |ns, batch| Ok(ns.destroy(batch)),
            // A namespace that is gone took its sockets with it.
            DestroyOutcome::Gone,
            |e| DestroyOutcome::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    }

    /// Each socket's last data received/sent, from the kernel's tcp_info.
    pub(super) fn sample(&mut self, targets: &[SocketRef]) -> Vec<Sampled> {
        self.per_namespace(
            targets,
            |ns, batch| {
                let found = ns.diag.activity(batch)?;
                Ok(found
                    .into_iter()
                    .map(|a| a.map_or(Sampled::Gone, Sampled::Seen))
                    .collect())
            },
            Sampled::Gone,
            |_| Sampled::Unknown,
        )
    }

    /// Runs `op` once per namespace over that namespace's targets, in
    /// batches, and puts the answers back in the targets' order.
    fn per_namespace<T: Clone>(
        &mut self,
        targets: &[SocketRef],
        mut op: impl FnMut(&mut netns::Netns, &[SocketRef]) -> std::io::Result<Vec<T>>,
        unreachable: T,
        failed: impl Fn(&std::io::Error) -> T,
    ) -> Vec<T> {
        // The usual case, every target in one namespace, goes as it is:
        // grouping and copying 100k targets cost a mass expiry 10-40 ms
        // before its first destroy.
        if let Some(first) = targets.first() {
            let cookie = first.netns_cookie;
            if targets.iter().all(|t| t.netns_cookie == cookie) {
                return self.in_namespace(cookie, targets, &mut op, &unreachable, &failed);
            }
        }
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            groups.entry(t.netns_cookie).or_default().push(i);
        }
        let mut out: Vec<T> = vec![unreachable.clone(); targets.len()];
        for (cookie, indexes) in groups {
            let batch: Vec<SocketRef> = indexes.iter().map(|&i| targets[i]).collect();
            let answers = self.in_namespace(cookie, &batch, &mut op, &unreachable, &failed);
            for (i, a) in indexes.into_iter().zip(answers) {
                out[i] = a;
            }
        }
        out
    }

    /// `op` over targets that all live in the namespace `cookie`: one
    /// answer each, `unreachable` for all if the daemon holds no way into
    /// that namespace, `failed` for all if the request failed.
    fn in_namespace<T: Clone>(
        &mut self,
        cookie: u64,
        targets: &[SocketRef],
        op: &mut impl FnMut(&mut netns::Netns, &[SocketRef]) -> std::io::Result<Vec<T>>,
        unreachable: &T,
        failed: &impl Fn(&std::io::Error) -> T,
    ) -> Vec<T> {
        let ns = if cookie == self.netns_cookie {
            Some(&mut self.own)
        } else {
            self.namespaces.get(cookie)
        };
        let Some(ns) = ns else {
            return vec![unreachable.clone(); targets.len()];
        };
        match op(ns, targets) {
            Ok(answers) => answers,
            Err(e) => {
                warn!(netns = cookie, "sock_diag request failed: {e}");
                vec![failed(&e); targets.len()]
            }
        }
    }

    /// Kills local flows without SOCK_DESTROY: reads each socket's counters,
    /// sends it (from its peer) and its peer (from it) a RST with the exact
    /// next sequence number, then checks the socket is gone. The in-kernel
    /// drop is already in force, so the flow is dead either way.
    pub(super) fn reset_sockets(&mut self, targets: &[(SocketRef, Flow)]) -> Vec<DestroyOutcome> {
        let sockets: Vec<SocketRef> = targets.iter().map(|(t, _)| *t).collect();
        let before = self.sample(&sockets);
        let mut sent = vec![false; targets.len()];
        for (i, ((target, flow), reading)) in targets.iter().zip(&before).enumerate() {
            let Sampled::Seen(now) = reading else {
                continue;
            };
            let (rcv_nxt, snd_nxt, snd_una) = rst::next_sequences(flow, &now.counters);
            let (local, remote) = tuple::addrs_of(&target.tuple);
            let mut segments = vec![
                rst::Rst {
                    src: remote,
                    dst: local,
                    seq: rcv_nxt,
                },
                rst::Rst {
                    src: local,
                    dst: remote,
                    seq: snd_nxt,
                },
            ];
            if snd_una != snd_nxt {
                // Data in flight: the peer's RCV.NXT is one of the two.
                segments.push(rst::Rst {
                    src: local,
                    dst: remote,
                    seq: snd_una,
                });
            }
            let ns = if target.netns_cookie == self.netns_cookie {
                Some(&mut self.own)
            } else {
                self.namespaces.get(target.netns_cookie)
            };
            if let Some(ns) = ns {
                sent[i] = segments.iter().all(|s| match ns.inject.send(s) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(cookie = target.cookie, "injecting a RST: {e}");
                        false
                    }
                });
            }
        }
        // The RSTs are delivered by the stack shortly; give them a moment.
        let mut after = self.sample(&sockets);
        for _ in 0..20 {
            if after
                .iter()
                .all(|r| !matches!(r, Sampled::Seen(a) if a.counters.state != TCP_CLOSE))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            after = self.sample(&sockets);
        }
        before
            .iter()
            .zip(after)
            .zip(sent)
            .map(|((b, a), sent)| match (b, a) {
                (Sampled::Gone, _) => DestroyOutcome::Gone,
                (_, Sampled::Gone) if sent => DestroyOutcome::Destroyed,
                (_, Sampled::Seen(a)) if sent && a.counters.state == TCP_CLOSE => {
                    DestroyOutcome::Destroyed
                }
                _ => DestroyOutcome::Failed(libc::ETIMEDOUT),
            })
            .collect()
    }

    /// Sends each end of a forwarded flow its RST(s), out of the interface
    /// the end lives behind, addressed to the MAC its packets came from.
    /// Returns how many were sent.
    pub(super) fn reset_forwarded_flow(&mut self, key: &FlowTuple, flow: &Forwarded) -> usize {
        let Some(frames) = &self.frames else {
            return 0;
        };
        let mut sent = 0;
        for (to, segment) in rst::forwarded_resets(key, flow) {
            let end = &flow.ends[to];
            let frame = rst::ethernet_frame(end.mac, end.via_mac, &segment);
            match send_frame(frames, end.ifindex, end.mac, &frame) {
                Ok(()) => sent += 1,
                Err(e) => warn!(
                    ifindex = end.ifindex,
                    "sending a RST to {}: {e}", segment.dst
                ),
            }
        }
        sent
    }
}

fn send_frame(
    fd: &std::os::fd::OwnedFd,
    ifindex: u32,
    dst_mac: [u8; 6],
    frame: &[u8],
) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&dst_mac);
    sys::send_to(fd.as_fd(), frame, &ll)
}
