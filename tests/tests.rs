//! End-to-end tests: the built `mixtral-gptq` over the bundled fixtures.

mod calibrate;
mod compare;
mod eval;
mod eval_device;
mod quantize;
mod util;
mod verify;
