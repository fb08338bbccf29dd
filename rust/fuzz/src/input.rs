//! Decoding a kernel call from fuzzer bytes. Past the end of the bytes every read gives 0,
//! so every byte string decodes to some call, and short inputs to small ones.

use crate::reference::acc;
use sparseroute_core::Element;

pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }

    pub fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&first, rest)) => {
                self.bytes = rest;
                first
            }
            None => 0,
        }
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// A number in `0..n` (`n >= 1`), from one byte where that covers it.
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 256 {
            self.byte() as usize % n
        } else {
            self.u32() as usize % n
        }
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// A float32 value from a palette that makes ties and extreme magnitudes common; with
    /// `raw_bits`, one time in eight any bit pattern (NaN and infinities included). Callers
    /// choose `raw_bits` once per call, so that most calls hold only finite values.
    pub fn value(&mut self, raw_bits: bool) -> f32 {
        const PALETTE: [f32; 15] =
            [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 7.25, 30.0, -30.0, 88.0, -90.0, 1e-3, 1e-30, -200.0];
        match self.byte() {
            224.. if raw_bits => f32::from_bits(self.u32()),
            _ => {
                let i = self.below(PALETTE.len());
                // A small integer step keeps the palette's values near but not always at ties.
                PALETTE[i] + f32::from(self.byte() % 4) * 0.25
            }
        }
    }

    /// [`Input::value`] in the element type `L` (rounded to nearest even where it is narrower).
    pub fn element<L: Element>(&mut self, raw_bits: bool) -> L {
        L::from_acc(acc(f64::from(self.value(raw_bits))))
    }
}

/// `$check::<L>($input)` for the element type `L` numbered `$index`: 0 float32, 1 bfloat16,
/// 2 float16, anything else float64.
macro_rules! with_element_type {
    ($index:expr, $check:ident($input:expr)) => {
        match $index {
            0 => $check::<f32>($input),
            1 => $check::<half::bf16>($input),
            2 => $check::<half::f16>($input),
            _ => $check::<f64>($input),
        }
    };
}
pub(crate) use with_element_type;
