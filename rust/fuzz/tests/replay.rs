//! Every fuzz check on stable Rust, as part of `make test`: on the inputs committed under
//! `regressions/<check>/` (each once made a check fail) and on pseudo-random byte strings
//! from a fixed seed, so that a run is repeatable. `make fuzz` searches far wider.

use std::path::Path;

/// xorshift64*: enough to spread bytes; fixed seed, so every run sees the same inputs.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u8 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
    }
}

const RANDOM_INPUTS: usize = 400;

#[test]
fn every_check_passes_on_random_inputs() {
    for (name, check) in sparseroute_fuzz::CHECKS {
        let mut bytes = Bytes(0x5eed_0000 + name.len() as u64);
        for i in 0..RANDOM_INPUTS {
            // Lengths from empty to a few kilobytes: short inputs decode to small calls.
            let len = (i * 37) % 4096;
            let input: Vec<u8> = (0..len).map(|_| bytes.next()).collect();
            check(&input);
        }
    }
}

#[test]
fn every_check_passes_on_its_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    for (name, check) in sparseroute_fuzz::CHECKS {
        let Ok(entries) = std::fs::read_dir(root.join(name)) else { continue };
        for entry in entries {
            let path = entry.expect("a readable directory").path();
            check(&std::fs::read(&path).expect("a readable input"));
        }
    }
}

#[test]
fn every_fuzz_target_has_a_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(dir)
        .expect("fuzz_targets/")
        .map(|entry| {
            entry.expect("an entry").path().file_stem().expect("a name").to_string_lossy().into_owned()
        })
        .collect();
    targets.sort();
    let mut checks: Vec<String> = sparseroute_fuzz::CHECKS.iter().map(|(name, _)| name.to_string()).collect();
    checks.sort();
    assert_eq!(targets, checks);
}
