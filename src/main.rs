//! The `jolt` binary: parse the command line, run, turn the outcome into an exit code.

fn main() {
    let code = jolt::run(std::env::args_os());
    std::process::exit(code);
}
