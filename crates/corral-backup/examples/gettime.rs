use corral_backup::target::{S3Settings, Target};
#[tokio::main]
async fn main() {
    let url = std::env::args().nth(1).unwrap();
    let endpoint = std::env::args().nth(2).unwrap();
    let s = S3Settings {
        endpoint: Some(endpoint),
        ..Default::default()
    };
    let t = Target::open(&url, &s).unwrap();
    for name in ["small", "small", "page", "page", "small"] {
        let t0 = std::time::Instant::now();
        let b = t.get(name).await.unwrap();
        println!("{name} {} bytes {:?}", b.len(), t0.elapsed());
    }
    let t0 = std::time::Instant::now();
    let l = t.list("").await.unwrap();
    println!("list {} {:?}", l.len(), t0.elapsed());
    for name in ["small", "page"] {
        let t0 = std::time::Instant::now();
        let b = t.get(name).await.unwrap();
        println!("{name} {} bytes {:?}", b.len(), t0.elapsed());
    }
}
