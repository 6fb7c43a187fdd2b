//! The server's predict-body parser (`mmembed_server::wire`) on arbitrary
//! bytes: it must answer Ok or a 400, never panic, whatever the JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match mmembed_server::wire::parse_predict_body(data, 64) {
        Ok(reqs) => {
            assert!(!reqs.is_empty() && reqs.len() <= 64);
            for r in &reqs {
                assert!(r.validate().is_ok());
            }
        }
        Err(e) => assert_eq!(e.code, mmembed_server::Code::InvalidArgument),
    }
});
