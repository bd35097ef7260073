//! The `jolt` binary: parse the command line, run, turn the outcome into an exit code.

fn main() -> std::process::ExitCode {
    jolt::run(std::env::args_os()).into()
}
