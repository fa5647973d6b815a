// FoldGPT Android demo. Build: ./gradlew assembleDebug (see README.md for the wrapper).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()        // AndroidX, which executorch-android depends on
        mavenCentral()  // org.pytorch:executorch-android, fbjni, soloader
    }
}

rootProject.name = "FoldGPTDemo"
include(":app")
