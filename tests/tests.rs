//! End-to-end tests: the built `mixtral-gptq` over the bundled fixtures.

mod util;
mod calibrate;
mod verify;
mod eval;
mod quantize;
mod compare;
