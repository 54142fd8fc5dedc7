//! Workloads shared by Sluice's criterion benchmarks (`benches/`): realistic flow mixes and table
//! snapshots, built once outside the measured loops.
