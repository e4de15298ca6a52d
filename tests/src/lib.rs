//! Simulated node for real-kernel tests (being written).
