//! The XDP program, assembled here as eBPF instructions (no BPF toolchain at build time, no
//! BTF needed at load time). It steers IPv4/IPv6 UDP datagrams to the gateway's ports into
//! the AF_XDP socket of the receive queue (`bpf_redirect_map(xskmap, rx_queue_index,
//! XDP_PASS)`: a queue without a socket passes to the kernel) and passes everything else to
//! the kernel untouched: ARP, ICMP, other ports, VLAN-tagged frames, IPv4 with options or
//! fragmented, IPv6 with extension headers.
#![forbid(unsafe_code)]

/// `XDP_PASS`.
pub const XDP_PASS: i32 = 2;
/// `BPF_FUNC_redirect_map`.
const FUNC_REDIRECT_MAP: i32 = 51;
/// Most ports the program matches (one compare each).
pub const MAX_PORTS: usize = 16;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// The 8-byte wire form.
    pub fn encode(self) -> u64 {
        let b0 = u64::from(self.code);
        let b1 = u64::from((self.dst & 0xf) | (self.src << 4));
        let off = u64::from(self.off as u16);
        let imm = u64::from(self.imm as u32);
        b0 | b1 << 8 | off << 16 | imm << 32
    }
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
const MOV64_K: u8 = 0xb7;
const MOV64_X: u8 = 0xbf;
const ADD64_K: u8 = 0x07;
const AND64_K: u8 = 0x57;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JGT_X: u8 = 0x2d;
const JA: u8 = 0x05;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_DW_IMM: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;

/// A tiny assembler with forward labels.
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of jumps to patch.
    fixups: Vec<(usize, usize)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn new() -> Self {
        Asm {
            insns: Vec::new(),
            fixups: Vec::new(),
            labels: Vec::new(),
        }
    }
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, l: usize) {
        self.labels[l] = Some(self.insns.len());
    }
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: usize) {
        self.fixups.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }
    fn finish(mut self) -> Vec<Insn> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l].expect("every label is bound");
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// The program for `ports` (host order; 1..=[`MAX_PORTS`] of them) redirecting to the
/// XSKMAP whose fd is `xskmap_fd`.
pub fn program(ports: &[u16], xskmap_fd: i32) -> Vec<Insn> {
    assert!(!ports.is_empty() && ports.len() <= MAX_PORTS);
    // Registers: r6 = ctx, r2 = data, r3 = data_end, r4 = bound check, r5 = field.
    let mut a = Asm::new();
    let (pass, ipv6, port, redirect) = (a.label(), a.label(), a.label(), a.label());
    a.op(MOV64_X, 6, 1, 0, 0);
    a.op(LDX_W, 2, 1, 0, 0); // xdp_md.data
    a.op(LDX_W, 3, 1, 4, 0); // xdp_md.data_end
    // Ethernet.
    a.op(MOV64_X, 4, 2, 0, 0);
    a.op(ADD64_K, 4, 0, 0, 14);
    a.jump(JGT_X, 4, 3, 0, pass);
    a.op(LDX_H, 5, 2, 12, 0); // ethertype, loaded little-endian
    a.jump(JEQ_K, 5, 0, i32::from(0x86ddu16.swap_bytes()), ipv6);
    a.jump(JNE_K, 5, 0, i32::from(0x0800u16.swap_bytes()), pass);
    // IPv4 without options: 14 + 20 + 8 bytes.
    a.op(MOV64_X, 4, 2, 0, 0);
    a.op(ADD64_K, 4, 0, 0, 42);
    a.jump(JGT_X, 4, 3, 0, pass);
    a.op(LDX_B, 5, 2, 14, 0);
    a.jump(JNE_K, 5, 0, 0x45, pass);
    a.op(LDX_B, 5, 2, 23, 0);
    a.jump(JNE_K, 5, 0, 17, pass);
    a.op(LDX_H, 5, 2, 20, 0); // flags + fragment offset
    a.op(AND64_K, 5, 0, 0, i32::from(0x3fffu16.swap_bytes()));
    a.jump(JNE_K, 5, 0, 0, pass);
    a.op(LDX_H, 5, 2, 36, 0); // UDP destination port
    a.jump(JA, 0, 0, 0, port);
    // IPv6 with UDP as the first next header: 14 + 40 + 8 bytes.
    a.bind(ipv6);
    a.op(MOV64_X, 4, 2, 0, 0);
    a.op(ADD64_K, 4, 0, 0, 62);
    a.jump(JGT_X, 4, 3, 0, pass);
    a.op(LDX_B, 5, 2, 20, 0);
    a.jump(JNE_K, 5, 0, 17, pass);
    a.op(LDX_H, 5, 2, 56, 0);
    // Port set.
    a.bind(port);
    for &p in ports {
        a.jump(JEQ_K, 5, 0, i32::from(p.swap_bytes()), redirect);
    }
    a.jump(JA, 0, 0, 0, pass);
    a.bind(redirect);
    a.op(LDX_W, 2, 6, 16, 0); // xdp_md.rx_queue_index
    a.op(LD_DW_IMM, 1, PSEUDO_MAP_FD, 0, xskmap_fd);
    a.op(0, 0, 0, 0, 0);
    a.op(MOV64_K, 3, 0, 0, XDP_PASS); // flags: the action when the queue has no socket
    a.op(CALL, 0, 0, 0, FUNC_REDIRECT_MAP);
    a.op(EXIT, 0, 0, 0, 0);
    a.bind(pass);
    a.op(MOV64_K, 0, 0, 0, XDP_PASS);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small interpreter for exactly the opcodes the program uses, over a packet, so the
    /// program's decisions are tested without a kernel. Returns `Some(queue)` for a redirect
    /// (the helper's key), `None` for XDP_PASS.
    fn run(prog: &[Insn], pkt: &[u8], queue: u32) -> Option<u32> {
        // Pointers are modelled as offsets into `pkt`; the ctx is register value u64::MAX.
        let mut r = [0i64; 11];
        r[1] = -1;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (d, s) = (usize::from(i.dst), usize::from(i.src));
            pc += 1;
            let jump = |pc: &mut usize| *pc = (*pc as i64 + i64::from(i.off)) as usize;
            match i.code {
                MOV64_X => r[d] = r[s],
                MOV64_K => r[d] = i64::from(i.imm),
                ADD64_K => r[d] += i64::from(i.imm),
                AND64_K => r[d] &= i64::from(i.imm),
                LDX_W | LDX_H | LDX_B if r[s] == -1 => {
                    r[d] = match i.off {
                        0 => 0,
                        4 => pkt.len() as i64,
                        16 => i64::from(queue),
                        o => panic!("ctx offset {o}"),
                    }
                }
                LDX_W | LDX_H | LDX_B => {
                    let at = (r[s] + i64::from(i.off)) as usize;
                    let n = match i.code {
                        LDX_W => 4,
                        LDX_H => 2,
                        _ => 1,
                    };
                    // The verifier would refuse an unchecked read: make sure we checked.
                    assert!(at + n <= pkt.len(), "unchecked read at {at}");
                    let mut v = [0u8; 8];
                    v[..n].copy_from_slice(&pkt[at..at + n]);
                    r[d] = i64::from_le_bytes(v);
                }
                JGT_X => {
                    if r[d] > r[s] {
                        jump(&mut pc)
                    }
                }
                JEQ_K => {
                    if r[d] == i64::from(i.imm) {
                        jump(&mut pc)
                    }
                }
                JNE_K => {
                    if r[d] != i64::from(i.imm) {
                        jump(&mut pc)
                    }
                }
                JA => jump(&mut pc),
                LD_DW_IMM => {
                    assert_eq!(i.src, PSEUDO_MAP_FD);
                    r[d] = i64::from(i.imm);
                    pc += 1;
                }
                CALL => {
                    assert_eq!((i.imm, r[3]), (FUNC_REDIRECT_MAP, i64::from(XDP_PASS)));
                    r[0] = 1000 + r[2];
                }
                EXIT => {
                    return if r[0] == i64::from(XDP_PASS) {
                        None
                    } else {
                        Some((r[0] - 1000) as u32)
                    };
                }
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn frame(src: &str, dst: &str) -> Vec<u8> {
        let spec = super::super::frame::FrameSpec {
            src_mac: [2; 6],
            dst_mac: [4; 6],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ip_id: 1,
        };
        let mut out = vec![0u8; 200];
        let n = super::super::frame::build(&spec, b"payload", &mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn steers_only_our_udp_ports() {
        let p = program(&[4433, 9], 7);
        assert_eq!(p.iter().filter(|i| i.code == EXIT).count(), 2);
        for (pkt, want) in [
            (frame("10.0.0.2:5000", "10.0.0.1:4433"), Some(3)),
            (frame("10.0.0.2:5000", "10.0.0.1:9"), Some(3)),
            (frame("[fd00::2]:5000", "[fd00::1]:4433"), Some(3)),
            (frame("10.0.0.2:4433", "10.0.0.1:4434"), None),
            (frame("[fd00::2]:4433", "[fd00::1]:53"), None),
        ] {
            assert_eq!(run(&p, &pkt, 3), want, "{pkt:02x?}");
        }
        let v4 = frame("10.0.0.2:5000", "10.0.0.1:4433");
        // Short frames, ARP, ICMP, a fragment, IPv4 options: all passed.
        for cut in [0, 13, 14, 41] {
            assert_eq!(run(&p, &v4[..cut], 0), None);
        }
        let mut arp = v4.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut icmp = v4.clone();
        icmp[23] = 1;
        let mut frag = v4.clone();
        frag[21] = 1;
        let mut opts = v4.clone();
        opts[14] = 0x46;
        let mut v6ext = frame("[fd00::2]:5000", "[fd00::1]:4433");
        v6ext[20] = 0; // hop-by-hop options first
        for pkt in [arp, icmp, frag, opts, v6ext] {
            assert_eq!(run(&p, &pkt, 0), None);
        }
    }

    #[test]
    fn encoding() {
        let i = Insn {
            code: LDX_H,
            dst: 5,
            src: 2,
            off: 12,
            imm: -1,
        };
        assert_eq!(
            i.encode().to_le_bytes(),
            [0x69, 0x25, 12, 0, 0xff, 0xff, 0xff, 0xff]
        );
    }
}
