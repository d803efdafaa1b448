//! What the agent's integration tests share: the real sync over an in-memory map store.

use lb_agent::{
    config::ModelConfig,
    dataplane::{
        store::MemoryStore,
        writer::{Writer, WriterConfig},
    },
    model::maglev,
    sync::Syncer,
};

/// The sync pipeline (state, model, writer) for node `cfg`, writing to memory.
pub fn memory_syncer(cfg: ModelConfig) -> Syncer<MemoryStore> {
    let writer = Writer::new(
        MemoryStore::new(1 << 16, 1024),
        WriterConfig {
            maglev_max_size: maglev::DEFAULT_MAX_SIZE,
            max_services: 1024,
            answer_service_pings: true,
        },
    )
    .expect("an empty store");
    Syncer::new(cfg, writer)
}
