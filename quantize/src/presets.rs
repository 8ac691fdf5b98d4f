//! The seven branches of TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ as typed presets.

use crate::error::{Error, Result};

/// The settings of one published branch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// The Hub branch name.
    pub name: &'static str,
    /// Bits per weight.
    pub bits: u32,
    /// Group size, -1 for none.
    pub group_size: i32,
    /// Act-order (`desc_act`).
    pub desc_act: bool,
    /// Damping as a fraction of the mean Hessian diagonal.
    pub damp_percent: f64,
    /// Symmetric quantizer.
    pub sym: bool,
    /// Static groups (computed before act-order permutation); TheBloke did not use them.
    pub static_groups: bool,
    /// True-sequential subsets within a layer.
    pub true_sequential: bool,
}

const fn thebloke(name: &'static str, bits: u32, group_size: i32) -> Preset {
    Preset {
        name,
        bits,
        group_size,
        desc_act: true,
        damp_percent: 0.1,
        sym: true,
        static_groups: false,
        true_sequential: true,
    }
}

/// The seven branches, in the order of TheBloke's README.
pub const PRESETS: [Preset; 7] = [
    thebloke("main", 4, -1),
    thebloke("gptq-4bit-128g-actorder_True", 4, 128),
    thebloke("gptq-4bit-32g-actorder_True", 4, 32),
    thebloke("gptq-3bit--1g-actorder_True", 3, -1),
    thebloke("gptq-3bit-128g-actorder_True", 3, 128),
    thebloke("gptq-8bit--1g-actorder_True", 8, -1),
    thebloke("gptq-8bit-128g-actorder_True", 8, 128),
];

impl Preset {
    /// Looks a preset up by its branch name.
    pub fn by_name(name: &str) -> Result<Preset> {
        PRESETS
            .iter()
            .copied()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::UnknownPreset {
                name: name.to_string(),
                known: PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_unknown() {
        assert_eq!(
            Preset::by_name("gptq-3bit-128g-actorder_True")
                .unwrap()
                .bits,
            3
        );
        assert_eq!(Preset::by_name("main").unwrap().group_size, -1);
        let err = Preset::by_name("gptq-5bit").unwrap_err().to_string();
        assert!(err.contains("gptq-5bit") && err.contains("main"), "{err}");
    }
}
