fn main() {
    println!("walship-bench: benchmarks arrive with the benchmark issue");
}
