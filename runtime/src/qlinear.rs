//! GPTQ "v1" quantized linear weights: unpacking and dequantization (placeholder, being written).
