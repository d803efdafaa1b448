//! Datapath benchmark (BPF_PROG_TEST_RUN timings); see `lb-bench datapath`.

pub fn datapath() {
    eprintln!("datapath bench: not written yet");
    std::process::exit(2);
}
