from clip_pipeline.app import main

main()
