//! Builds the eBPF programs (probes-ebpf) for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker (see shared/TOOLCHAIN.md and scripts/setup.sh).

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../probes-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hakmem-probes-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
}
