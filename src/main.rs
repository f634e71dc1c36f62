fn main() -> std::process::ExitCode {
    zerofs_ublk::cli::main()
}
