#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sparseroute_fuzz::balance(data));
