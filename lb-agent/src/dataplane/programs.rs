//! Loading the object's programs into the kernel (verification happens here).

use anyhow::{Context, Result, bail};
use aya::{Ebpf, programs::Program};

/// Loads (verifies) every program of the object, so a broken program fails at start, not when
/// its hook is first attached.
pub fn load_all(ebpf: &mut Ebpf) -> Result<()> {
    for (name, program) in ebpf.programs_mut() {
        let loaded = match program {
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            other => {
                bail!("program {name} has a type this agent does not load: {:?}", other.prog_type())
            }
        };
        loaded.with_context(|| format!("the kernel refused program {name}"))?;
    }
    Ok(())
}
