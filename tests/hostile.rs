//! Hostile safetensors files.
