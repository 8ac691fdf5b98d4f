//! End-to-end tests: the built `mixtral-gptq` over the bundled fixtures.

mod bench;
mod calibrate;
mod compare;
mod eval;
mod eval_device;
mod quantize;
mod synth;
mod util;
mod verify;
