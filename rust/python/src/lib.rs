//! `sparseroute._core`: the compiled module. This file is its manifest: everything Python
//! can reach is registered here.

// Binding functions mirror the Python call signatures of the kernels, arguments and all.
#![allow(clippy::too_many_arguments)]

mod arrays;
mod balance;
mod batching;
mod buffers;
mod cache;
mod depth;
mod errors;
mod placement;
mod routing;
mod schedule;

use pyo3::prelude::*;

/// The instruction set of the CPU kernels: "avx512", "avx2" or "baseline".
#[pyfunction]
fn simd_level() -> &'static str {
    sparseroute_core::simd::level()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add("InvalidInputError", m.py().get_type::<errors::InvalidInputError>())?;
    m.add_function(wrap_pyfunction!(routing::topk_gating, m)?)?;
    m.add_function(wrap_pyfunction!(routing::topk_gating_backward, m)?)?;
    m.add_function(wrap_pyfunction!(routing::topp_gating, m)?)?;
    m.add_function(wrap_pyfunction!(routing::expert_choice, m)?)?;
    m.add_function(wrap_pyfunction!(routing::expert_choice_slots, m)?)?;
    m.add_function(wrap_pyfunction!(routing::expert_choice_backward, m)?)?;
    m.add_function(wrap_pyfunction!(routing::build_plan, m)?)?;
    m.add_function(wrap_pyfunction!(routing::build_capacity_plan, m)?)?;
    m.add_function(wrap_pyfunction!(routing::gather_rows, m)?)?;
    m.add_function(wrap_pyfunction!(routing::combine_rows, m)?)?;
    m.add_function(wrap_pyfunction!(routing::slot_dots, m)?)?;
    m.add_function(wrap_pyfunction!(balance::score_sums, m)?)?;
    m.add_function(wrap_pyfunction!(balance::score_sums_backward, m)?)?;
    m.add_function(wrap_pyfunction!(balance::expert_counts, m)?)?;
    m.add_function(wrap_pyfunction!(balance::z_loss, m)?)?;
    m.add_function(wrap_pyfunction!(balance::z_loss_backward, m)?)?;
    m.add_function(wrap_pyfunction!(balance::sinkhorn, m)?)?;
    m.add_class::<batching::PyBatcher>()?;
    m.add_function(wrap_pyfunction!(batching::replay_batching, m)?)?;
    m.add_function(wrap_pyfunction!(batching::prefetch_plan, m)?)?;
    m.add_class::<cache::PyExpertCache>()?;
    m.add_function(wrap_pyfunction!(cache::simulate_cache, m)?)?;
    m.add_function(wrap_pyfunction!(depth::select_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(depth::gather_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(depth::scatter_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(depth::token_dots, m)?)?;
    m.add_function(wrap_pyfunction!(depth::layer_plan, m)?)?;
    m.add_function(wrap_pyfunction!(depth::bucket_by_plan, m)?)?;
    m.add_function(wrap_pyfunction!(schedule::sparsity_schedule, m)?)?;
    m.add_function(wrap_pyfunction!(placement::plan_placement, m)?)?;
    m.add_function(wrap_pyfunction!(placement::greedy_placement, m)?)?;
    m.add_function(wrap_pyfunction!(placement::rebalance_placement, m)?)?;
    m.add_function(wrap_pyfunction!(placement::logical_to_physical, m)?)?;
    m.add_function(wrap_pyfunction!(placement::replica_map, m)?)?;
    m.add_function(wrap_pyfunction!(buffers::pooled_empty, m)?)?;
    m.add_function(wrap_pyfunction!(buffers::set_buffer_cache_limit, m)?)?;
    m.add_function(wrap_pyfunction!(buffers::buffer_cache_info, m)?)?;
    Ok(())
}
