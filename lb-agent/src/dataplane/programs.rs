//! Loading the object's programs into the kernel (verification happens here).

use std::{
    fmt,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, programs::Program};

/// The verifier's limit on the instructions it walks to accept one program
/// (BPF_COMPLEXITY_LIMIT_INSNS, the same since 5.2): past it, the kernel refuses the program.
pub const VERIFIER_LIMIT: u32 = 1_000_000;

/// What one program's load cost: the verifier's walk grows with every branch a change adds,
/// and differs by kernel (6.1's and 6.18's walks of one program differ by up to a quarter,
/// either way), so the agent logs it and the tests keep it well under [`VERIFIER_LIMIT`] on
/// both.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub name: String,
    /// Instructions as the kernel runs them (translated).
    pub instructions: u32,
    /// Instructions the verifier walked (kernels before 5.16 do not say).
    pub verified: Option<u32>,
    pub took: Duration,
}

impl fmt::Display for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verified = self.verified.map_or(String::from("?"), |v| v.to_string());
        write!(f, "{} {}/{} {} ms", self.name, self.instructions, verified, self.took.as_millis())
    }
}

/// Loads (verifies) every program of the object the agent attaches, so a broken program fails
/// at start, not when its hook is first attached; says what each cost. (The object's
/// benchmark programs, `PROG_BENCH`, are never attached.)
pub fn load_all(ebpf: &mut Ebpf) -> Result<Vec<Loaded>> {
    let mut loaded = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        if lb_common::PROG_BENCH.contains(&name) {
            continue;
        }
        loaded.push(load_one(name, program)?);
    }
    loaded.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(loaded)
}

/// Loads the program `name` of `ebpf` if it is not yet loaded.
pub fn load_if_needed(ebpf: &mut Ebpf, name: &str) -> Result<Option<Loaded>> {
    let program = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?;
    if program.fd().is_ok() {
        return Ok(None);
    }
    load_one(name, program).map(Some)
}

fn load_one(name: &str, program: &mut Program) -> Result<Loaded> {
    let start = Instant::now();
    let result = match program {
        Program::SchedClassifier(p) => p.load(),
        Program::Xdp(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        other => {
            bail!("program {name} has a type this agent does not load: {:?}", other.prog_type())
        }
    };
    result.with_context(|| format!("the kernel refused program {name}"))?;
    let took = start.elapsed();
    let info = program.info().with_context(|| format!("reading program {name}'s info"))?;
    Ok(Loaded {
        name: name.to_owned(),
        instructions: info.size_translated().unwrap_or(0) / 8,
        verified: info.verified_instruction_count(),
        took,
    })
}
